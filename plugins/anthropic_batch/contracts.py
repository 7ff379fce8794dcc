"""The typed contracts between the library's modules (pydantic v2): what goes through XCom and what
lies on storage. ARCHITECTURE.md points here instead of restating the schemas.

Light imports only: DAG files import this module (pydantic is already imported by Airflow).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.status import LedgerState, RunMode

# -- run contracts


# -- submission contracts

#: Prefix of the id of a synchronous run of a chunk (``sync_<chunk fingerprint[:24]>``). Ledger
#: files and handles written before sync runs had their own field carried it as ``batch_id``.
SYNC_RUN_PREFIX = "sync_"


def sync_run_id_for(chunk_fingerprint: str) -> str:
    """The id of the synchronous run of a chunk (names its results Parquet file, like a batch id)."""
    return SYNC_RUN_PREFIX + str(chunk_fingerprint)[:24]


def _map_old_sync_form(data: Any) -> Any:
    """An older handle/entry of a sync run named it by a fake ``batch_id`` ``sync_...``: move it to
    ``sync_run_id`` (``batch_id`` is a Message Batch id only)."""
    if (
        isinstance(data, dict)
        and data.get("mode") == RunMode.SYNC
        and str(data.get("batch_id") or "").startswith(SYNC_RUN_PREFIX)
    ):
        data = {**data, "sync_run_id": data.get("sync_run_id") or data["batch_id"], "batch_id": None}
    return data


class BatchHandle(BaseModel):
    """What submit returns (XCom: ``model_dump(mode="json")``) and the sensor, the wait, collect
    and resubmit consume: one submitted chunk, either a Message Batch or a synchronous run."""

    model_config = ConfigDict(frozen=True)

    #: The Message Batch; None for a synchronous run.
    batch_id: str | None = None
    mode: RunMode = RunMode.BATCH
    #: The synchronous run (``sync_<fingerprint[:24]>``); None for a batch.
    sync_run_id: str | None = None
    #: None only for a handle made from a bare batch id (the sensor accepts one).
    chunk_path: str | None = None
    ledger_path: str | None = None
    attempt: int = 1
    #: A synchronous run's results JSONL; for a batch, set once collected.
    results_path: str | None = None
    n_requests: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_sync_form(cls, data: Any) -> Any:
        return _map_old_sync_form(data)

    @model_validator(mode="after")
    def _one_id(self) -> BatchHandle:
        if self.mode == RunMode.SYNC:
            if not self.sync_run_id or self.batch_id:
                raise ValueError("a sync handle has a sync_run_id and no batch_id")
        elif not self.batch_id:
            raise ValueError(f"a {self.mode} handle needs a batch_id")
        return self

    @property
    def is_sync(self) -> bool:
        return self.mode == RunMode.SYNC

    @property
    def run_id(self) -> str:
        """The batch id, or the sync run id: what names the chunk's results file."""
        return str(self.sync_run_id if self.is_sync else self.batch_id)

    @classmethod
    def of(cls, value: BatchHandle | dict[str, Any] | str) -> BatchHandle:
        """The handle of an XCom value: a handle's JSON, or a bare batch id string."""
        if isinstance(value, BatchHandle):
            return value
        if isinstance(value, str):
            return cls(batch_id=value)
        if isinstance(value, dict):
            return cls.model_validate(value)
        raise ValueError(f"Expected a BatchHandle dict or a batch id string, got {value!r}")

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class LedgerEntryError(AnthropicBatchError, ValueError):
    """A ledger file that does not hold a valid LedgerEntry (names the file and the field)."""


class LedgerEntry(BaseModel):
    """One ledger file ``_ledger/{dag_id}/{partition}/{task_id}/{chunk_fingerprint}.json`` (see
    ``ledger.py``). Every field is optional: older versions and hand-written files (the ambiguity
    message tells a human to edit one) carry fewer, and absence means something
    (``create_started_at`` missing: the create may have been sent), so entries are written back
    with ``exclude_unset``."""

    # Hand-written or older files may carry fields this version does not know; they are kept.
    model_config = ConfigDict(extra="allow")

    # identity of the submission
    ledger_key: str | None = None
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    map_index: int | None = None
    partition: str | None = None
    pipeline: str | None = None
    attempt: int | None = None
    chunk_path: str | None = None
    chunk_fingerprint: str | None = None
    n_requests: int | None = None
    n_bytes: int | None = None
    model: str | None = None
    mode: RunMode | None = None
    # lifecycle
    state: LedgerState | None = None
    intent_at: str | None = None
    submitted_at: str | None = None
    # the batch (batch mode) or the synchronous run (sync mode); times are RFC 3339 UTC strings
    batch_id: str | None = None
    sync_run_id: str | None = None
    processing_status: str | None = None
    request_counts: dict[str, int] | None = None
    created_at: str | None = None
    expires_at: str | None = None
    ended_at: str | None = None
    results_path: str | None = None
    # cost
    projected_cost_usd: float | None = None
    cost_usd: float | None = None
    sync_cost_usd: float | None = None
    # the claim (see ledger.OwnerWatch)
    owner: str | None = None
    generation: int | None = None
    heartbeat_at: str | None = None
    lease_seconds: float | None = None
    create_started_at: str | None = None
    taken_over_from: str | None = None
    recovered: bool | None = None
    identity_verified: bool | None = None
    # takeover bookkeeping
    previous_batch_ids: list[str] = Field(default_factory=list)
    duplicate_batch_ids: list[str] = Field(default_factory=list)
    foreign_batch_ids: list[str] = Field(default_factory=list)
    taken_over_batch_ids: list[str] = Field(default_factory=list)
    # cancel.py
    cancel_reason: str | None = None
    canceled_by: str | None = None
    cancel_requested_at: str | None = None
    # collection
    collected_path: str | None = None
    collected_at: str | None = None
    counts_by_status: dict[str, int] | None = None
    # sync_backend
    n_reused_from_batches: int | None = None
    n_paid_twice: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_sync_form(cls, data: Any) -> Any:
        return _map_old_sync_form(data)

    @property
    def recorded_id(self) -> str | None:
        """The batch or sync run on record (None: still an intent)."""
        return self.batch_id or self.sync_run_id

    @classmethod
    def parse(cls, data: bytes | str | dict[str, Any], path: Any) -> LedgerEntry:
        """Validate one ledger file's content; a :class:`LedgerEntryError` names the file and field."""
        try:
            if isinstance(data, dict):
                return cls.model_validate(data)
            return cls.model_validate_json(data)
        except ValidationError as err:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in err.errors()
            )
            raise LedgerEntryError(f"Ledger entry {path} is not valid: {problems}") from err

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields as stored: only those set (absence of a field means something)."""
        return self.model_dump(mode="json", exclude_unset=True)
