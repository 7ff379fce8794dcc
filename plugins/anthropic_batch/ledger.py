"""The submission ledger: never pay for the same chunk twice.

One JSON file per submission at ``_ledger/{dag_id}/{partition}/{task_id}/{chunk_fingerprint}.json``
(the ``LedgerEntry`` of ARCHITECTURE.md), written atomically. :func:`submit_idempotently` is the
policy every submitting operator goes through:

1. The entry has a ``batch_id``: re-attach to that batch (no API create). Exception: a batch that
   ended fully canceled (a user killed the wait) processed nothing and cost nothing, so a retry
   submits a fresh one (the old id is kept in ``previous_batch_ids``).
2. The entry is only an ``intent``: a worker died between writing the intent and recording the
   batch id. Its create may or may not have reached the API, so the listing decides
   (:func:`resolve_orphans`): batches created since ``intent_at`` (minus a clock skew) with the
   same request count, not already recorded by another ledger entry of the partition.
   Exactly one -> record it and re-attach. More than one -> fail loudly and let a human choose
   (never a silent second submission). None -> submit; but a batch can take a moment to show up
   in the listing, so if the intent is younger than ``orphan_settle_seconds`` we wait out that
   window and list once more before deciding. The trade-off, chosen deliberately: after that
   window, "not listed" is taken as "never created"; the residual risk is a create that took
   effect but stays unlisted longer than the window, which would be paid twice.
3. No entry: write the intent (atomically) *before* calling the API, then the batch id right after.

``mode="sync"`` is a backend of its own, :func:`sync_backend.run_chunk`: the chunk goes through the
synchronous Messages API now (taking over a batch of the same chunk still in flight), with its
progress persisted in parts so that a crash resumes without paying again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from anthropic_batch import storage
from anthropic_batch.storage import PathLike, as_path

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from anthropic.types.messages import MessageBatch

    from anthropic_batch.hooks import BatchHook

log = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
#: How far before ``intent_at`` a dead worker's batch may claim to have been created (clock skew
#: between our workers and the API).
ORPHAN_CLOCK_SKEW = timedelta(minutes=2)
#: How long a new batch may take to appear in the listing; see the module docstring.
ORPHAN_SETTLE_SECONDS = 30.0
#: Creates that may fail ambiguously (and be found not to exist) before the task gives up.
MAX_AMBIGUOUS_CREATES = 3


class LedgerState(StrEnum):
    """Lifecycle of a ledger entry."""

    INTENT = "intent"
    SUBMITTED = "submitted"
    ENDED = "ended"


class SubmitAction(StrEnum):
    """What :func:`submit_idempotently` does for an existing (or missing) entry."""

    SUBMIT = "submit"
    REATTACH = "reattach"
    RECOVER = "recover"


class AmbiguousSubmissionError(RuntimeError):
    """Several batches could be the one a dead worker created; a human has to pick."""


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
def decide_action(entry: dict[str, Any] | None) -> SubmitAction:
    """The action for an entry: nothing or nothing usable -> submit; an id -> re-attach; intent -> recover."""
    if not entry:
        return SubmitAction.SUBMIT
    if entry.get("batch_id"):
        return SubmitAction.REATTACH
    if entry.get("state") == LedgerState.INTENT and entry.get("intent_at"):
        return SubmitAction.RECOVER
    return SubmitAction.SUBMIT


def resolve_orphans(candidates: Iterable[MessageBatch], known_batch_ids: set[str]) -> list[MessageBatch]:
    """Candidates a dead worker may have created: those no other ledger entry has claimed."""
    return [batch for batch in candidates if batch.id not in known_batch_ids]


def is_fully_canceled(batch: MessageBatch | dict[str, Any]) -> bool:
    """True for an ended batch whose every request was canceled (nothing processed, nothing billed)."""
    data = batch if isinstance(batch, dict) else batch.model_dump(mode="json")
    counts = data.get("request_counts") or {}
    total = sum(
        int(counts.get(k) or 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")
    )
    return data.get("processing_status") == "ended" and total > 0 and counts.get("canceled") == total


def ambiguity_message(path: ObjectStoragePath, candidates: list[MessageBatch], n_requests: int) -> str:
    ids = ", ".join(f"{b.id} (created {rfc3339(b.created_at)})" for b in candidates)
    return (
        f"Cannot tell which batch an interrupted submission created: {len(candidates)} unclaimed batches "
        f"with {n_requests} requests appeared after its intent was written: {ids}. Not submitting again. "
        f"Inspect them in the Anthropic Console (https://console.anthropic.com/workspaces/default/batches), "
        f'then either write the right one into the ledger file {path} as "batch_id" (and "state": '
        f'"submitted"), or delete that file to force a new submission; cancel the batches you do not '
        "keep. Then clear this task."
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


def handle_from_entry(entry: dict[str, Any], ledger_path: PathLike) -> dict[str, Any]:
    """The BatchHandle (XCom of submit) for a ledger entry that has a batch id."""
    return {
        "batch_id": entry["batch_id"],
        "chunk_path": entry["chunk_path"],
        "ledger_path": str(ledger_path),
        "mode": entry.get("mode") or "batch",
        "attempt": int(entry.get("attempt") or 1),
        "results_path": entry.get("results_path"),
        "n_requests": int(entry["n_requests"]),
    }


def sync_results_path(chunk_path: PathLike) -> ObjectStoragePath:
    """``{work_dir}/sync/chunk-NNNNN.results.jsonl`` for ``{work_dir}/requests/chunk-NNNNN.jsonl``."""
    chunk = as_path(chunk_path)
    stem = chunk.name.removesuffix(".jsonl")
    return chunk.parent.parent / "sync" / f"{stem}.results.jsonl"


def update_entry(path: PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the ledger entry at ``path`` (atomic rewrite); returns the new entry."""
    entry = storage.read_json(path)
    if entry is None:
        raise FileNotFoundError(f"No ledger entry at {path}")
    entry.update(fields)
    storage.atomic_write_json(path, entry)
    return entry


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
    work = as_path(work_dir)
    if work.name.startswith("date=") and work.parent.name == "work":
        return work.parent.parent.parent
    return storage.storage_root()


# -- the ledger files ----------------------------------------------------------------------------
class SubmissionLedger:
    """Ledger entries under ``{root}/_ledger``; ``root`` is the storage root."""

    def __init__(self, root: PathLike) -> None:
        self.root = as_path(root)
        self.base = self.root / LEDGER_DIR

    def entry_path(
        self, dag_id: str, partition: str, task_id: str, chunk_fingerprint: str
    ) -> ObjectStoragePath:
        return self.base / dag_id / partition / task_id / f"{chunk_fingerprint}.json"

    def read(self, path: PathLike) -> dict[str, Any] | None:
        return storage.read_json(path)

    def write(self, path: PathLike, entry: dict[str, Any]) -> dict[str, Any]:
        storage.atomic_write_json(path, entry)
        return entry

    def update(self, path: PathLike, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the entry at ``path`` (atomic rewrite); returns the new entry."""
        return update_entry(path, **fields)

    def iter_entries(
        self, dag_id: str | None = None, partition: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every entry (optionally of one DAG and/or partition), each with ``ledger_path`` added."""
        if not self.base.exists():
            return
        pattern = f"{dag_id or '*'}/{partition or '*'}/*/*.json"
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
        return ids


# -- the policy --------------------------------------------------------------------------------------
def submit_idempotently(
    hook: BatchHook,
    ledger: SubmissionLedger,
    *,
    chunk_path: str,
    chunk_fingerprint: str,
    n_requests: int,
    n_bytes: int,
    dag_id: str,
    task_id: str,
    run_id: str,
    map_index: int,
    partition: str,
    pipeline: str,
    attempt: int,
    model: str,
    mode: str,
    projected_cost_usd: float | None = None,
    submit: Callable[[], MessageBatch] | None = None,
    orphan_settle_seconds: float = ORPHAN_SETTLE_SECONDS,
    sync_concurrency: int = 8,
) -> dict[str, Any]:
    """
    Submit one chunk at most once and return its BatchHandle; see the module docstring.

    ``submit`` overrides how the batch is created (default: ``hook.create_batch_from_chunk``).
    """
    # Imported here: the hooks module loads the anthropic SDK, and DAG files import this module.
    from anthropic_batch.hooks import AmbiguousCreateError

    path = ledger.entry_path(dag_id, partition, task_id, chunk_fingerprint)
    entry = ledger.read(path)
    # -- mode=sync: the sync backend (its own module; owned by the sample/sync change) -------------
    if mode == "sync":
        from anthropic_batch.sync_backend import run_chunk

        identity = {
            "dag_id": dag_id, "task_id": task_id, "run_id": run_id, "map_index": map_index,
            "partition": partition, "pipeline": pipeline, "attempt": attempt, "chunk_path": chunk_path,
            "chunk_fingerprint": chunk_fingerprint, "n_requests": n_requests, "n_bytes": n_bytes,
            "model": model, "projected_cost_usd": projected_cost_usd,
        }  # fmt: skip
        return run_chunk(hook, ledger, path, entry, identity=identity, concurrency=sync_concurrency)
    # -- end mode=sync -------------------------------------------------------------------------------
    action = decide_action(entry)
    previous_ids: list[str] = list((entry or {}).get("previous_batch_ids") or [])

    if action is SubmitAction.REATTACH:
        assert entry is not None
        if mode == "sync" or entry.get("mode") == "sync" or not _was_fully_canceled(hook, entry):
            log.info(
                "Re-attaching to %s %s recorded in %s (submitted %s); nothing is submitted again.",
                entry.get("mode") or "batch",
                entry["batch_id"],
                path,
                entry.get("submitted_at"),
            )
            if entry.get("chunk_path") != chunk_path:
                entry = ledger.update(path, chunk_path=chunk_path)
            return handle_from_entry(entry, path)
        log.warning(
            "Batch %s of this chunk ended fully canceled (nothing processed or billed); submitting anew.",
            entry["batch_id"],
        )
        previous_ids.append(entry["batch_id"])

    if action is SubmitAction.RECOVER and mode != "sync":
        assert entry is not None
        found = _recover_orphan(hook, ledger, path, entry, n_requests, orphan_settle_seconds)
        if found is not None:
            entry = ledger.update(
                path,
                state=LedgerState.SUBMITTED.value,
                submitted_at=entry.get("submitted_at") or rfc3339(utc_now()),
                recovered=True,
                **batch_fields(found),
            )
            log.info("Recovered batch %s created by an interrupted attempt; re-attaching.", found.id)
            return handle_from_entry(entry, path)

    if action is SubmitAction.RECOVER and mode == "sync":
        assert entry is not None
        intent = entry  # keep the intent: the partial results file is what resumes
    else:
        intent = {
            "ledger_key": f"{dag_id}/{partition}/{task_id}/{chunk_fingerprint}",
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": run_id,
            "map_index": map_index,
            "partition": partition,
            "pipeline": pipeline,
            "attempt": attempt,
            "chunk_path": chunk_path,
            "chunk_fingerprint": chunk_fingerprint,
            "n_requests": n_requests,
            "n_bytes": n_bytes,
            "model": model,
            "mode": mode,
            "state": LedgerState.INTENT.value,
            "intent_at": rfc3339(utc_now()),
            "submitted_at": None,
            "batch_id": None,
            "processing_status": None,
            "request_counts": None,
            "created_at": None,
            "expires_at": None,
            "ended_at": None,
            "results_path": None,
            "projected_cost_usd": projected_cost_usd,
            "cost_usd": None,
            "sync_cost_usd": None,
            "previous_batch_ids": previous_ids,
        }
        # The intent is on storage before any request leaves: a crash after this point is recoverable.
        ledger.write(path, intent)

    create = submit or (lambda: hook.create_batch_from_chunk(chunk_path))
    for tries_left in range(MAX_AMBIGUOUS_CREATES - 1, -1, -1):
        try:
            batch = create()
            break
        except AmbiguousCreateError as err:
            # The request went out and no answer came back: look before resending (same policy as
            # for an intent left by a dead worker; other entries' batches are excluded).
            log.warning("%s Looking for it before anything else.", err)
            # A short pause first: the new batch needs a moment to be listed, and a sibling task that
            # created a same-sized batch at the same time needs a moment to record its id.
            time.sleep(min(orphan_settle_seconds, 10.0))
            found = _recover_orphan(
                hook,
                ledger,
                path,
                intent,
                n_requests,
                orphan_settle_seconds,
                reason="the create got no answer",
            )
            if found is not None:
                entry = ledger.update(
                    path,
                    state=LedgerState.SUBMITTED.value,
                    submitted_at=rfc3339(utc_now()),
                    recovered=True,
                    **batch_fields(found),
                )
                return handle_from_entry(entry, path)
            if not tries_left:
                raise
    entry = ledger.update(
        path, state=LedgerState.SUBMITTED.value, submitted_at=rfc3339(utc_now()), **batch_fields(batch)
    )
    log.info("Submitted batch %s (%d requests, %d bytes) from %s.", batch.id, n_requests, n_bytes, chunk_path)
    return handle_from_entry(entry, path)


def _was_fully_canceled(hook: BatchHook, entry: dict[str, Any]) -> bool:
    """Whether the recorded batch ended fully canceled; unknown (API trouble) counts as no."""
    if is_fully_canceled(entry):
        return True
    if entry.get("processing_status") == "ended":
        return False
    try:
        return is_fully_canceled(hook.get_batch(entry["batch_id"]))
    except Exception as exc:
        log.warning("Could not check batch %s before re-attaching: %s", entry["batch_id"], exc)
        return False


def _recover_orphan(
    hook: BatchHook,
    ledger: SubmissionLedger,
    path: ObjectStoragePath,
    entry: dict[str, Any],
    n_requests: int,
    settle_seconds: float,
    reason: str = "the previous attempt died during submission",
) -> MessageBatch | None:
    """The batch the interrupted attempt created, None if it created none; raises if ambiguous."""
    intent_at = parse_rfc3339(entry["intent_at"])
    since = intent_at - ORPHAN_CLOCK_SKEW
    log.warning(
        "Ledger %s holds only an intent from %s: %s. Looking for a batch of %d requests it may have created.",
        path,
        entry["intent_at"],
        reason,
        n_requests,
    )

    def candidates() -> list[MessageBatch]:
        known = ledger.known_batch_ids(partition=entry.get("partition"))
        return resolve_orphans(hook.find_orphan_batches(since, n_requests), known)

    found = candidates()
    wait = (intent_at + timedelta(seconds=settle_seconds) - utc_now()).total_seconds()
    if not found and wait > 0:
        log.info("No batch listed yet; the intent is recent, listing again in %.0fs.", wait)
        time.sleep(wait)
        found = candidates()
    if len(found) > 1:
        raise AmbiguousSubmissionError(ambiguity_message(path, found, n_requests))
    if not found:
        log.info("No batch from the interrupted attempt exists: it never took effect. Submitting.")
        return None
    return found[0]
