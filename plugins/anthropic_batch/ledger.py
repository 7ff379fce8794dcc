"""The submission ledger: persistence only. Never pay for the same chunk twice starts here.

One JSON file per submission at ``_ledger/{dag_id}/{partition}/{task_id}/{chunk_fingerprint}.json``
(:class:`~anthropic_batch.contracts.LedgerEntry`). This module owns the entry and every write to it; the
policy that decides what to write (claim, re-attach, take over, recover an orphan, create the batch
or run the chunk synchronously) is :mod:`anthropic_batch.submission`, which sits above this module
and the execution backends. Every write is conditional (``storage``'s ``create_if_absent`` /
``replace_if_version``), never read-then-overwrite:

- :func:`new_intent` / :func:`intent_fields`: the entry a submission claims with create-if-absent;
- :func:`cas_update` / :func:`update_entry`: compare-and-swap on the version read, retried on a
  conflict; :func:`owned_update`: only while this worker still owns the intent (else
  :class:`LostClaimError`);
- :class:`OwnerWatch` / :class:`Heartbeat`: the lease. The owner rewrites ``heartbeat_at`` every
  ``lease_seconds / 4``; an entry that did not change for a whole lease on the observer's monotonic
  clock (or whose heartbeat is older than a lease plus :data:`CLOCK_SKEW` on its wall clock) belongs
  to a dead worker, whose intent may be taken over (``generation`` +1);
- :func:`reset_foreign_batch`, :func:`add_ids`: takeover bookkeeping (``previous_batch_ids``,
  ``duplicate_batch_ids``, ``foreign_batch_ids``);
- :class:`SubmissionLedger`: the files under ``{root}/_ledger``, read by the UI too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from anthropic_batch import layout, storage
from anthropic_batch.contracts import BatchHandle, LedgerEntry, LedgerEntryError
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.layout import sync_results_path  # noqa: F401  (re-exported)
from anthropic_batch.status import (
    REQUEST_COUNT_KEYS,
    LedgerState,
    ProcessingStatus,
    RequestCountKey,
    RunMode,
)
from anthropic_batch.storage import PathLike, as_path

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from anthropic.types.messages import MessageBatch

log = logging.getLogger(__name__)

LEDGER_DIR = layout.LEDGER_DIR
#: How far apart the clocks of our workers and the API may be. Orphan search looks this far before
#: the create started (a worker clock up to this much fast still finds its own orphan), and a
#: heartbeat older than a lease plus this much is dead without waiting out a lease.
CLOCK_SKEW = timedelta(minutes=10)
#: An intent whose entry did not change for this long (its owner heartbeats 4 times per lease) is
#: a dead worker's; see :class:`OwnerWatch`.
LEASE_SECONDS = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 UTC text (``...Z``) of an aware datetime."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- pure policy -----------------------------------------------------------------------------------


def is_fully_canceled(batch: MessageBatch | dict[str, Any]) -> bool:
    """True for an ended batch whose every request was canceled (nothing processed, nothing billed)."""
    data = batch if isinstance(batch, dict) else batch.model_dump(mode="json")
    counts = data.get("request_counts") or {}
    total = sum(int(counts.get(k) or 0) for k in REQUEST_COUNT_KEYS)
    return (
        data.get("processing_status") == ProcessingStatus.ENDED
        and total > 0
        and counts.get(RequestCountKey.CANCELED) == total
    )


def batch_fields(batch: MessageBatch | dict[str, Any]) -> dict[str, Any]:
    """Ledger fields taken from a batch object."""
    data = batch if isinstance(batch, dict) else batch.model_dump(mode="json")
    return {
        "batch_id": data["id"],
        "processing_status": data.get("processing_status"),
        "request_counts": data.get("request_counts"),
        "created_at": data.get("created_at"),
        "expires_at": data.get("expires_at"),
        "ended_at": data.get("ended_at"),
    }


def recorded(entry: dict[str, Any] | None) -> bool:
    """Whether an entry records its batch or its synchronous run (else it is still an intent)."""
    return bool(entry and (entry.get("batch_id") or entry.get("sync_run_id")))


def handle_from_entry(entry: dict[str, Any], ledger_path: PathLike) -> BatchHandle:
    """The BatchHandle (XCom of submit) for a ledger entry that records a batch or a sync run."""
    model = LedgerEntry.parse(entry, ledger_path)
    if model.n_requests is None or model.chunk_path is None:
        raise LedgerEntryError(f"Ledger entry {ledger_path} has no chunk_path or n_requests.")
    return BatchHandle(
        batch_id=model.batch_id,
        sync_run_id=model.sync_run_id,
        chunk_path=model.chunk_path,
        ledger_path=str(ledger_path),
        mode=model.mode or RunMode.BATCH,
        attempt=model.attempt or 1,
        results_path=model.results_path,
        n_requests=model.n_requests,
    )


def ended_fields(batch: dict[str, Any]) -> dict[str, Any]:
    """Ledger fields for a batch that has ended (what the sensor records)."""
    return {**batch_fields(batch), "state": LedgerState.ENDED.value}


def ledger_root_for(work_dir: PathLike, storage_root: str | None = None) -> ObjectStoragePath:
    """The storage root whose ``_ledger`` a run uses: ``storage_root`` if given, else the root of
    the layout ``{root}/{pipeline}/work/date=...`` that ``work_dir`` sits in, else the configured root.

    Deriving it from ``work_dir`` keeps the ledger next to the data it describes, so a task that
    was not told the root still finds the earlier submissions.
    """
    if storage_root:
        return storage.storage_root(storage_root)
    parts = layout.parse_work_dir(work_dir)
    if parts is not None:
        return parts.root
    return storage.storage_root()


# -- the ledger files ----------------------------------------------------------------------------
class SubmissionLedger:
    """Ledger entries under ``{root}/_ledger``; ``root`` is the storage root."""

    def __init__(self, root: PathLike) -> None:
        self.root = as_path(root)
        self.base = storage.ledger_root(self.root)

    def entry_path(
        self, dag_id: str, partition: str, task_id: str, chunk_fingerprint: str
    ) -> ObjectStoragePath:
        return layout.ledger_entry_path(self.base, dag_id, partition, task_id, chunk_fingerprint)

    def read(self, path: PathLike) -> dict[str, Any] | None:
        """The entry at ``path`` (validated as a LedgerEntry), or None if there is none."""
        return read_entry(path)

    def write(self, path: PathLike, entry: dict[str, Any]) -> dict[str, Any]:
        entry = LedgerEntry.parse(entry, path).to_dict()
        storage.atomic_write_json(path, entry)
        return entry

    def iter_entries(
        self, dag_id: str | None = None, partition: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every entry (optionally of one DAG and/or partition), each with ``ledger_path`` added."""
        if not self.base.exists():
            return
        pattern = layout.ledger_glob(dag_id, partition)
        for path in sorted(self.base.glob(pattern), key=str):
            if storage.TMP_MARKER in path.name:
                continue
            try:
                entry = self.read(path)
            except (OSError, ValueError) as exc:
                log.warning("Unreadable ledger entry %s: %s", path, exc)
                continue
            if entry:
                yield {**entry, "ledger_path": str(path)}

    def known_batch_ids(self, partition: str | None = None) -> set[str]:
        """Batch ids recorded by any entry (of a partition), including earlier ones of each entry."""
        ids: set[str] = set()
        for entry in self.iter_entries(partition=partition):
            if entry.get("batch_id"):
                ids.add(entry["batch_id"])
            ids.update(entry.get("previous_batch_ids") or [])
            ids.update(entry.get("duplicate_batch_ids") or [])
        return ids


# -- claims: compare-and-swap on the entry ---------------------------------------------------------
class LostClaimError(AnthropicBatchError, RuntimeError):
    """Another worker took this chunk's entry over (or it was deleted) while we held it."""


class ClaimTimeoutError(AnthropicBatchError, RuntimeError):
    """A live worker kept this chunk's intent longer than we were willing to wait for its batch id."""


def decode_entry(data: bytes | str, path: PathLike) -> dict[str, Any]:
    """A ledger file's bytes as an entry, validated by :class:`LedgerEntry` (older forms mapped);
    a :class:`LedgerEntryError` names the file and the field."""
    return LedgerEntry.parse(data, path).to_dict()


def read_entry(path: PathLike) -> dict[str, Any] | None:
    """The entry at ``path`` validated by :class:`LedgerEntry`, or None if there is no file."""
    raw = storage.read_json(path)
    return None if raw is None else LedgerEntry.parse(raw, path).to_dict()


def encode_entry(entry: dict[str, Any], path: PathLike = "(new ledger entry)") -> bytes:
    """The bytes of a ledger entry (validated by :class:`LedgerEntry`; as ``storage.atomic_write_json``
    writes JSON)."""
    fields = LedgerEntry.parse(entry, path).to_dict()
    text = json.dumps(fields, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return (text + "\n").encode("utf-8")


def cas_update(
    path: PathLike, change: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> tuple[dict[str, Any], bool]:
    """Apply ``change`` to the entry at ``path`` by compare-and-swap, retrying on a conflict.

    ``change`` gets the current entry and returns the new one, or None to leave it as it is.
    Returns ``(entry, True)`` when written, ``(current entry, False)`` when ``change`` declined.
    Raises FileNotFoundError when there is no entry.
    """
    while True:
        current = storage.read_with_version(path)
        if current is None:
            raise FileNotFoundError(f"No ledger entry at {path}")
        entry = decode_entry(current[0], path)
        new = change(dict(entry))
        if new is None:
            return entry, False
        data = encode_entry(new, path)
        if storage.replace_if_version(path, data, current[1]):
            return decode_entry(data, path), True


def update_entry(path: PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the ledger entry at ``path`` (compare-and-swap); returns the new entry."""
    return cas_update(path, lambda entry: {**entry, **fields})[0]


def add_ids(entry: dict[str, Any], field: str, *ids: str) -> dict[str, Any]:
    return {**entry, field: sorted({*(entry.get(field) or []), *ids})}


class OwnerWatch:
    """Tells a dead worker's intent from a live one's.

    The owner of an intent rewrites ``heartbeat_at`` every ``lease_seconds / 4`` (:class:`Heartbeat`),
    which changes the entry's version. The owner is dead when the entry has not changed for a whole
    lease as measured on *our* monotonic clock, so a clock difference between workers cannot make a
    live owner look dead. Shortcut: an entry whose ``heartbeat_at`` is older than a lease plus
    :data:`CLOCK_SKEW` by our wall clock is dead at once (a worker whose clock runs more than that
    ahead of ours would be taken over early). An intent without ``owner``/``heartbeat_at`` (written
    by hand or by an older version) has no live owner.
    """

    def __init__(self) -> None:
        self.version: str | None = None
        self.since = 0.0

    def owner_is_dead(self, entry: dict[str, Any], version: str) -> bool:
        if not entry.get("owner") or not entry.get("heartbeat_at"):
            return True
        lease = float(entry.get("lease_seconds") or LEASE_SECONDS)
        if utc_now() - parse_rfc3339(entry["heartbeat_at"]) > timedelta(seconds=lease) + CLOCK_SKEW:
            return True
        now = time.monotonic()
        if version != self.version:
            self.version, self.since = version, now
            return False
        return now - self.since >= lease


class Heartbeat:
    """Keeps an owned intent alive (``heartbeat_at``) until its batch id is recorded or we exit."""

    def __init__(self, path: PathLike, owner: str, lease_seconds: float) -> None:
        self.path, self.owner = path, owner
        self.interval = max(lease_seconds / 4, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-heartbeat", daemon=True)

    def _beat(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        if entry.get("owner") != self.owner or recorded(entry):
            return None
        return {**entry, "heartbeat_at": rfc3339(utc_now())}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not cas_update(self.path, self._beat)[1]:
                    return  # recorded, taken over or deleted: nothing left to keep alive
            except FileNotFoundError:
                return
            except Exception as exc:  # a storage hiccup: the next beat may succeed
                log.warning("Ledger heartbeat on %s failed: %s", self.path, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def owned_update(path: PathLike, owner: str, **fields: Any) -> dict[str, Any]:
    """Update an intent we own; LostClaimError if another worker took it over or recorded a batch."""

    def change(entry: dict[str, Any]) -> dict[str, Any] | None:
        if entry.get("owner") != owner or recorded(entry):
            return None
        return {**entry, **fields}

    try:
        entry, written = cas_update(path, change)
    except FileNotFoundError as err:
        raise LostClaimError(f"Ledger entry {path} was deleted while this worker held it.") from err
    if not written:
        raise LostClaimError(
            f"Ledger entry {path} was taken over by {entry.get('owner')} (run {entry.get('run_id')})."
        )
    return entry


# -- takeover bookkeeping ----------------------------------------------------------------------------


def reset_foreign_batch(path: PathLike, batch_id: str) -> dict[str, Any]:
    """Un-record a batch found not to be the entry's (collect verified its results): the entry
    becomes an intent without owner or create, so the next submit of the chunk submits anew, and
    ``foreign_batch_ids`` keeps recovery from taking that batch again."""

    def change(entry: dict[str, Any]) -> dict[str, Any] | None:
        if entry.get("batch_id") != batch_id:
            return None  # already reset, or another batch recorded since
        return {
            **add_ids(entry, "foreign_batch_ids", batch_id),
            "state": LedgerState.INTENT.value,
            "owner": None,
            "heartbeat_at": None,
            "create_started_at": None,
            "recovered": False,
            "identity_verified": None,
            **dict.fromkeys(
                ("batch_id", "processing_status", "request_counts", "created_at", "expires_at", "ended_at"),
            ),
            **dict.fromkeys(("submitted_at", "results_path", "collected_path")),
        }

    return cas_update(path, change)[0]


# -- new entries -------------------------------------------------------------------------------------
def intent_fields(*, previous_batch_ids: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """The fields of a fresh ``intent`` entry (no batch yet) for the submission ``fields`` name
    (dag_id, partition, task_id, chunk_fingerprint, ...); merged into an owned entry by the sync
    backend, completed with the claim fields by :func:`new_intent`."""
    return {
        "ledger_key": "/".join(
            str(fields[k]) for k in ("dag_id", "partition", "task_id", "chunk_fingerprint")
        ),
        **fields,
        "state": LedgerState.INTENT.value,
        "intent_at": rfc3339(utc_now()),
        "submitted_at": None,
        "batch_id": None,
        "sync_run_id": None,
        "processing_status": None,
        "request_counts": None,
        "created_at": None,
        "expires_at": None,
        "ended_at": None,
        "results_path": None,
        "cost_usd": None,
        "sync_cost_usd": None,
        "previous_batch_ids": list(previous_batch_ids or []),
    }


def new_intent(**fields: Any) -> dict[str, Any]:
    """The entry a submission claims (create-if-absent): :func:`intent_fields` plus a first
    heartbeat, generation 1 and no create started."""
    entry = intent_fields(**fields)
    return {**entry, "heartbeat_at": entry["intent_at"], "generation": 1, "create_started_at": None}
