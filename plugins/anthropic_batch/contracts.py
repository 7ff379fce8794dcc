"""The typed contracts between the library's modules and tasks: what is written to disk and carried
through XCom, in one place (ARCHITECTURE.md points here instead of restating the schema).

Producers build a model and write ``model.model_dump(mode="json")``; readers go through
``Model.model_validate`` (:func:`parse`, which names the file and the field at fault). Field names
are the on-disk names: files written before these models existed read unchanged. Fields added
later are optional with the default the readers assumed before, so an older file still validates.

Imported while DAGs are parsed: pydantic and the light library modules only.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.pricing import CostBreakdown
from anthropic_batch.status import LedgerState, RunMode

_M = TypeVar("_M", bound=BaseModel)


class ContractError(AnthropicBatchError, ValueError):
    """A file or XCom value does not match its contract; the message names the source and field."""


def parse(model: type[_M], data: Any, source: object) -> _M:
    """``model.model_validate(data)``, with an error naming ``source`` (a file) and each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ContractError(f"{source} is not a valid {model.__name__}: {problems}") from exc


# -- run contracts -------------------------------------------------------------------------------------
class ChunkInfo(BaseModel):
    """One chunk file of the manifest (``batch_requests`` writes it; ``answer_reuse`` re-packs it)."""

    index: int
    path: str  # URL or local path of requests/chunk-NNNNN.jsonl
    n_requests: int
    n_bytes: int
    fingerprint: str  # sha256 hex of the file bytes: the ledger key of its submission


class ManifestSpec(BaseModel):
    """The run's request spec, recorded so downstream tasks need no repeated configuration."""

    # Extra keys: ``prepare_requests(extra_manifest={"spec": {...}})`` merges caller-chosen keys here,
    # and files written by earlier versions may carry keys no reader uses any more.
    model_config = ConfigDict(extra="allow")

    pipeline: str | None = None
    partition: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    output_model: str | None = None  # "schemas/x.py:Model" or None
    output_mode: str | None = None  # "json_schema" | "tool" | None
    include_dir: str | None = None
    key_columns: list[str] = Field(default_factory=list)
    api_version: str | None = None
    cache_ttl: str | None = None  # added with prompt caching (older manifests: none, read as "5m")
    spec_fingerprint: str | None = None


class ReuseSection(BaseModel):
    """The manifest's ``reuse`` section (``answer_reuse.apply_reuse``)."""

    n_reused: int = 0
    n_reused_from_cache: int = 0
    n_to_send: int = 0
    reused_cost_usd: float = 0.0
    reused_sync_cost_usd: float = 0.0
    reused_path: str | None = None
    cache_dir: str | None = None
    cache_max_age_days: int | None = None


class CacheCheck(BaseModel):
    """The manifest's ``cache``: prepare's prompt-caching check of the shared prefix
    (``caching.log_prefix_check``; the sample gate projects from it)."""

    model: str | None = None
    marked: bool = False
    automatic: bool = False
    prefix_tokens: int = 0  # estimated, up to the last cache breakpoint
    minimum: int | None = None  # the model's minimum cacheable prompt length
    cacheable: bool = False
    as_of: str | None = None
    method: str | None = None
    warning: str | None = None  # set when the marked prefix is below the minimum


class Manifest(BaseModel):
    """``requests/manifest.json``: the run's chunks, counts, spec and resolved mode
    (``layout.read_manifest`` reads it)."""

    # Extra keys: ``prepare_requests(extra_manifest=...)`` lets callers record top-level keys of
    # their own, and they must survive the rewrites by apply_reuse and prepare.
    model_config = ConfigDict(extra="allow")

    chunks: list[ChunkInfo] = Field(default_factory=list)
    n_requests: int = 0  # every prepared request (one merged row each), reused or sent
    n_rejected: int = 0
    n_input_records: int = 0
    spec_fingerprint: str | None = None
    spec: ManifestSpec = Field(default_factory=ManifestSpec)
    mode: str = "batch"  # resolved "batch" | "sync"
    keys_path: str | None = None
    rejected_path: str | None = None
    warnings: list[str] = Field(default_factory=list)
    created_at: str | None = None
    source: str | None = None
    requested_mode: str | None = None
    deadline: str | None = None
    reuse: ReuseSection | None = None  # None until apply_reuse ran (and in older manifests)
    cache: CacheCheck | None = None  # None in manifests written before the check existed

    @property
    def reuse_or_empty(self) -> ReuseSection:
        """The reuse section, or one saying nothing was reused (older manifests have none)."""
        return self.reuse if self.reuse is not None else ReuseSection()


class SyncTakeover(BaseModel):
    """The run summary's ``sync_takeover``: batches in flight that mode=sync took over."""

    batch_ids: list[str] = Field(default_factory=list)
    n_reused_answers: int = 0
    n_paid_twice: int = 0
    paid_twice_custom_ids: list[str] = Field(default_factory=list)
    unresolved_batch_ids: list[str] = Field(default_factory=list)


class RunSummary(BaseModel):
    """``extractions/date=D/_gen=<id>/summary.json``, written by the publish step and returned
    through XCom. Cost, tokens and batch ids count only what this run sent; the ``reused_*`` costs
    are what the reused answers cost when they were paid for. Every field has a default: summaries
    of earlier versions (and the report's hand-made ones) lack the later ones."""

    pipeline: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    partition: str | None = None
    mode: str | None = None
    model: str | None = None
    n_input_records: int | None = None
    n_requests: int | None = None
    n_rows: int | None = None
    counts_by_status: dict[str, int] = Field(default_factory=dict)
    n_dead_letters: int = 0
    n_dead_letters_by_stage: dict[str, int] = Field(default_factory=dict)
    tokens: dict[str, int] = Field(default_factory=dict)  # input, output, cache_creation, cache_read
    cost_usd: float | None = None
    sync_cost_usd: float | None = None
    savings_usd: float | None = None
    cost_breakdown: CostBreakdown | None = None  # None in summaries written before issue 13
    batch_ids: list[str] = Field(default_factory=list)
    attempts: int | None = None
    price_table_as_of: str | None = None
    data_path: str | None = None
    dead_letter_path: str | None = None
    finished_at: str | None = None
    sample_cost_usd: float | None = None  # set when the sample gate paid answers (in cost_usd too)
    n_reused: int = 0
    n_reused_from_cache: int = 0
    reused_cost_usd: float = 0.0
    reused_sync_cost_usd: float = 0.0
    sync_takeover: SyncTakeover | None = None


# -- submission contracts ------------------------------------------------------------------------------

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


class LedgerEntryError(ContractError):
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
