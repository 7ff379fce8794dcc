"""Submission policy: never pay for the same chunk twice.

:func:`submit_idempotently` is what every submitting operator (submit, resubmit) goes through. It
sits above the ledger (:mod:`anthropic_batch.ledger`, persistence only) and the execution backends:
the Message Batches API through the hook, and the synchronous mode (:mod:`anthropic_batch.sync_backend`).

1. **Claim.** The intent is created with create-if-absent: of any number of concurrent submitters
   of one chunk (threads, processes, two runs of one date, a zombie beside its retry) exactly one
   creates it and goes on to submit.
2. **Lose.** The others read the entry. It has a ``batch_id``: re-attach (no API create; exception:
   a batch that ended fully canceled cost nothing and is replaced, its id kept in
   ``previous_batch_ids``). It is an intent whose owner is alive: poll (``claim_wait_seconds``)
   for the batch id, never submit. Whether the owner is alive is decided by ``ledger.OwnerWatch``:
   the owner rewrites ``heartbeat_at`` every ``lease_seconds / 4``; an entry that did not change for
   a whole lease on the observer's monotonic clock (or whose heartbeat is older than a lease plus
   ``ledger.CLOCK_SKEW`` on its wall clock) belongs to a dead worker.
3. **Take over** a dead worker's intent by compare-and-swap on the version read (``generation`` +1),
   so of two retries only one wins. If the dead worker had marked ``create_started_at`` its create
   may have reached the API, and the listing decides (:func:`_recover_orphan`): batches created
   since then (minus ``CLOCK_SKEW``) with the same request count that *no* ledger entry records
   (any DAG, date, task, chunk). Ended candidates are verified at once: every result line must
   answer a request of this chunk (custom_ids carry a digest of their request); a batch that is
   not ours is never taken. One left -> record it and re-attach (unverified if still running:
   collect verifies it before writing anything). Several -> fail loudly, a human picks. None ->
   submit; a batch can take a moment to be listed, so within ``orphan_settle_seconds`` of the create
   we list once more. After that window "not listed" is taken as "never created".
4. **Fence and record.** The owner marks ``create_started_at`` by compare-and-swap just before the
   create (a worker that lost its claim stops there), and records the batch id by compare-and-swap
   after it. First recorded wins: a batch created by a worker that was taken over although alive
   (paused longer than a lease) is canceled at once and kept in ``duplicate_batch_ids``. The
   residual window: a worker paused between its fence and its create, for longer than a lease.

``mode="sync"`` is a backend of its own, :func:`sync_backend.run_chunk`, run by the worker that
owns the entry (so two urgent reruns never both pay): the chunk goes through the synchronous
Messages API now, with its progress persisted in parts so that a crash resumes without paying
again. A sync submission that finds a batch of the same chunk (in flight or ended) takes that entry over
by compare-and-swap and hands the batch to the backend, which cancels it and reuses its answers.

Also the submit steps the operators share: the manifest's chunk (:func:`find_chunk`), who submits
(:func:`submission_identity`) and the projected cost.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from anthropic_batch import storage
from anthropic_batch.contracts import BatchHandle, ChunkInfo, Manifest
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.ledger import (
    CLOCK_SKEW,
    LEASE_SECONDS,
    ClaimTimeoutError,
    Heartbeat,
    LedgerState,
    LostClaimError,
    OwnerWatch,
    SubmissionLedger,
    add_ids,
    batch_fields,
    cas_update,
    decode_entry,
    encode_entry,
    handle_from_entry,
    is_fully_canceled,
    new_intent,
    owned_update,
    parse_rfc3339,
    recorded,
    rfc3339,
    update_entry,
    utc_now,
)
from anthropic_batch.pricing import load_price_table
from anthropic_batch.status import CancelReason, ProcessingStatus
from anthropic_batch.storage import PathLike

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath
    from anthropic.types.messages import MessageBatch

    from anthropic_batch.hooks import AnthropicBatchHook

log = logging.getLogger(__name__)

#: How long a submitter waits for a live worker to record the batch of the same chunk.
CLAIM_WAIT_SECONDS = 3600.0

#: How long a new batch may take to appear in the listing; see the module docstring.
ORPHAN_SETTLE_SECONDS = 30.0

#: Creates that may fail ambiguously (and be found not to exist) before the task gives up.
MAX_AMBIGUOUS_CREATES = 3


class AmbiguousSubmissionError(AnthropicBatchError, RuntimeError):
    """Several batches could be the one a dead worker created; a human has to pick."""


class ForeignBatchError(AnthropicBatchError, RuntimeError):
    """A batch's results answer requests that are not this chunk's: it is not ours to publish."""


def resolve_orphans(candidates: Iterable[MessageBatch], known_batch_ids: set[str]) -> list[MessageBatch]:
    """Candidates a dead worker may have created: those no other ledger entry has claimed."""
    return [batch for batch in candidates if batch.id not in known_batch_ids]


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


def iter_verified_lines(
    lines: Iterable[bytes], expected_custom_ids: set[str], *, batch_id: str, chunk_path: str
) -> Iterator[bytes]:
    """Pass result lines through, raising :class:`ForeignBatchError` at the first one whose
    ``custom_id`` is not a request of the chunk.

    custom_ids carry a digest of their request (``batch_requests.make_custom_id``), so a batch of
    another date or pipeline with the same keys but other text does not match.
    """
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import custom_id_of

    for line in lines:
        for part in line.splitlines() if b"\n" in line else (line,):
            if not part.strip():
                continue
            try:
                cid = custom_id_of(part)
            except (ValueError, KeyError, TypeError):
                continue  # malformed lines are counted by the collector
            if cid not in expected_custom_ids:
                raise ForeignBatchError(
                    f"Batch {batch_id} is not the batch of chunk {chunk_path}: its result line for "
                    f"custom_id {cid!r} answers a request that is not in the chunk."
                )
        yield line


def _is_ours(hook: AnthropicBatchHook, batch_id: str, chunk_path: str) -> bool:
    """Whether every result line of an ended batch answers a request of the chunk."""
    # loads pyarrow: kept out of DAG parsing
    from anthropic_batch.results import expected_ids_from_chunk

    lines = hook.iter_result_lines(batch_id)
    try:
        for _ in iter_verified_lines(
            lines, expected_ids_from_chunk(chunk_path), batch_id=batch_id, chunk_path=chunk_path
        ):
            pass
    except ForeignBatchError as err:
        log.warning("%s Not taking it.", err)
        return False
    finally:
        close = getattr(lines, "close", None)
        if close:
            close()
    return True


def submit_idempotently(
    hook: AnthropicBatchHook,
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
    lease_seconds: float = LEASE_SECONDS,
    claim_wait_seconds: float = CLAIM_WAIT_SECONDS,
) -> dict[str, Any]:
    """
    Submit one chunk at most once and return its BatchHandle as XCom carries it
    (``BatchHandle.model_dump(mode="json")``); see the module docstring.

    ``submit`` overrides how the batch is created (default: ``hook.create_batch_from_chunk``).
    ``lease_seconds``: how long our intent may go without a heartbeat before another worker may
    take it over. ``claim_wait_seconds``: how long to wait for a live worker's batch id.
    """
    path = ledger.entry_path(dag_id, partition, task_id, chunk_fingerprint)
    owner = uuid.uuid4().hex
    worker = {"owner": owner, "lease_seconds": lease_seconds, "run_id": run_id, "map_index": map_index}
    watch = OwnerWatch()
    deadline = time.monotonic() + claim_wait_seconds
    poll = min(1.0, lease_seconds / 4)
    waiting_logged = False
    may_create = True
    while True:
        intent = new_intent(
            dag_id=dag_id,
            task_id=task_id,
            partition=partition,
            chunk_fingerprint=chunk_fingerprint,
            pipeline=pipeline,
            attempt=attempt,
            chunk_path=chunk_path,
            n_requests=n_requests,
            n_bytes=n_bytes,
            model=model,
            mode=mode,
            projected_cost_usd=projected_cost_usd,
            **worker,
        )
        previous: dict[str, Any] | None = None
        takeover: dict[str, Any] | None = None
        # The claim: exactly one of any number of concurrent submitters creates the entry. A loser
        # that is waiting only re-reads (no create attempt per poll) until the entry is gone.
        if not (may_create and storage.create_if_absent(path, encode_entry(intent))):
            current = storage.read_with_version(path)
            if current is None:
                may_create = True
                continue  # deleted in between: claim again
            found, version = decode_entry(current[0], path), current[1]
            if found.get("batch_id") and _sync_takes_over(mode, found):
                # The urgent synchronous rerun: claim the entry (compare-and-swap below) and hand the
                # batch in flight to the sync backend, which cancels it and reuses its answers.
                takeover = found
                intent = {**intent, "generation": int(found.get("generation") or 1) + 1}
                for field in ("previous_batch_ids", "duplicate_batch_ids", "foreign_batch_ids"):
                    intent = add_ids(intent, field, *found.get(field) or [])
            elif recorded(found):
                if mode == "sync" or found.get("mode") == "sync" or not _was_fully_canceled(hook, found):
                    return _reattach(path, found, chunk_path).to_xcom()
                log.warning(
                    "Batch %s of this chunk ended fully canceled (nothing processed or billed); "
                    "submitting anew.",
                    found["batch_id"],
                )
                intent = {**intent, "generation": int(found.get("generation") or 1) + 1}
                for field in ("previous_batch_ids", "duplicate_batch_ids", "foreign_batch_ids"):
                    intent = add_ids(intent, field, *found.get(field) or [])
                intent = add_ids(intent, "previous_batch_ids", found["batch_id"])
            elif watch.owner_is_dead(found, version):
                # Take the intent over: the compare-and-swap lets only one of several retries win.
                previous = found
                mine = ("attempt", "chunk_path", "n_requests", "n_bytes", "model", "mode", "pipeline")
                intent = {
                    **intent,
                    **found,
                    **worker,
                    **{key: intent[key] for key in mine},
                    "generation": int(found.get("generation") or 1) + 1,
                    "heartbeat_at": rfc3339(utc_now()),
                    "create_started_at": None,
                    "taken_over_from": found.get("owner"),
                }
            else:
                if time.monotonic() > deadline:
                    raise ClaimTimeoutError(_claim_timeout_message(path, found, claim_wait_seconds))
                if not waiting_logged:
                    log.info(
                        "Another worker (run %s, map index %s) is submitting this chunk (%s, heartbeat %s); "
                        "waiting for its batch id instead of submitting.",
                        found.get("run_id"),
                        found.get("map_index"),
                        path,
                        found.get("heartbeat_at"),
                    )
                    waiting_logged = True
                may_create = False
                time.sleep(poll)
                continue
            if not storage.replace_if_version(path, encode_entry(intent), version):
                continue  # another worker changed it first: look again
        try:
            with Heartbeat(path, owner, lease_seconds):
                return _submit_owned(
                    hook,
                    ledger,
                    path,
                    intent,
                    previous,
                    takeover=takeover,
                    submit=submit,
                    orphan_settle_seconds=orphan_settle_seconds,
                    sync_concurrency=sync_concurrency,
                ).to_xcom()
        except LostClaimError as err:
            log.warning("%s Looking at the entry again.", err)


#: The ledger fields the sync backend records for a submission.
SYNC_IDENTITY_FIELDS = (
    "dag_id", "task_id", "run_id", "map_index", "partition", "pipeline", "attempt", "chunk_path",
    "chunk_fingerprint", "n_requests", "n_bytes", "model", "projected_cost_usd",
)  # fmt: skip


def _sync_takes_over(mode: str, found: dict[str, Any]) -> bool:
    """Whether a ``mode=sync`` submission takes over the batch recorded in ``found`` (a batch, not
    an earlier sync run): in flight it is canceled; either way its answers are reused and only the
    rest is sent now (``sync_backend``)."""
    return mode == "sync" and found.get("mode") != "sync"


def _claim_timeout_message(path: PathLike, entry: dict[str, Any], waited: float) -> str:
    return (
        f"Waited {waited:.0f}s for another worker (run {entry.get('run_id')}, map index "
        f"{entry.get('map_index')}, owner {entry.get('owner')}) to record the batch of this chunk in "
        f"{path}; its heartbeat ({entry.get('heartbeat_at')}) is still fresh, so it is alive and was "
        "not taken over. Check that task; clear this one when it has finished."
    )


def _reattach(path: ObjectStoragePath, entry: dict[str, Any], chunk_path: str) -> BatchHandle:
    log.info(
        "Re-attaching to %s %s recorded in %s (submitted %s); nothing is submitted again.",
        entry.get("mode") or "batch",
        entry.get("batch_id") or entry.get("sync_run_id"),
        path,
        entry.get("submitted_at"),
    )
    if entry.get("chunk_path") != chunk_path:
        entry = update_entry(path, chunk_path=chunk_path)
    return handle_from_entry(entry, path)


def _may_have_created(entry: dict[str, Any]) -> bool:
    """Whether a dead owner may have sent its create: it marks ``create_started_at`` first.
    An entry without that field (hand-written, older version) may have."""
    return "create_started_at" not in entry or entry["create_started_at"] is not None


def _submit_owned(
    hook: AnthropicBatchHook,
    ledger: SubmissionLedger,
    path: ObjectStoragePath,
    entry: dict[str, Any],
    previous: dict[str, Any] | None,
    *,
    takeover: dict[str, Any] | None = None,
    submit: Callable[[], MessageBatch] | None,
    orphan_settle_seconds: float,
    sync_concurrency: int,
) -> BatchHandle:
    """Submit the chunk of an entry this worker has claimed."""
    # Imported here: the hooks module loads the anthropic SDK, and DAG files import this module.
    from anthropic_batch.hooks import AmbiguousCreateError

    owner = entry["owner"]
    chunk_path = entry["chunk_path"]
    n_requests = int(entry["n_requests"])
    if entry.get("mode") == "sync":
        from anthropic_batch.sync_backend import run_chunk  # the SDK: not at DAG parse time

        # A dead worker's batch intent: its create may have reached the API. A batch found is taken
        # over like one in flight (canceled, its answers reused), never paid twice.
        if (
            takeover is None
            and previous is not None
            and previous.get("mode") != "sync"
            and _may_have_created(previous)
        ):
            found, _ = _recover_orphan(hook, ledger, path, previous, n_requests, orphan_settle_seconds)
            if found is not None:
                takeover = {**previous, **batch_fields(found)}

        identity = {key: entry.get(key) for key in SYNC_IDENTITY_FIELDS}
        return run_chunk(
            hook,
            ledger,
            path,
            takeover or entry,
            identity=identity,
            concurrency=sync_concurrency,
            fresh=previous is None and takeover is None,
        )

    if previous is not None and _may_have_created(previous):
        found, verified = _recover_orphan(hook, ledger, path, previous, n_requests, orphan_settle_seconds)
        if found is not None:
            log.info("Recovered batch %s created by an interrupted attempt; re-attaching.", found.id)
            return _record(
                hook, path, entry, found, created_here=False, recovered=True, identity_verified=verified
            )

    # Fencing: only a worker that still owns the intent marks it and sends the create.
    entry = owned_update(path, owner, create_started_at=rfc3339(utc_now()))
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
            found, verified = _recover_orphan(
                hook,
                ledger,
                path,
                entry,
                n_requests,
                orphan_settle_seconds,
                reason="the create got no answer",
            )
            if found is not None:
                # Cancel it on losing the record only if its results proved it ours.
                return _record(
                    hook,
                    path,
                    entry,
                    found,
                    created_here=verified,
                    recovered=True,
                    identity_verified=verified,
                )
            if not tries_left:
                raise
            entry = owned_update(path, owner, create_started_at=rfc3339(utc_now()))
    handle = _record(hook, path, entry, batch, created_here=True)
    log.info(
        "Submitted batch %s (%d requests, %d bytes) from %s.",
        batch.id,
        n_requests,
        entry["n_bytes"],
        chunk_path,
    )
    return handle


def _record(
    hook: AnthropicBatchHook,
    path: ObjectStoragePath,
    entry: dict[str, Any],
    batch: MessageBatch,
    *,
    created_here: bool,
    **extra: Any,
) -> BatchHandle:
    """Record ``batch`` as the chunk's, unless another worker recorded one first.

    First recorded wins. A batch we created that lost (only possible after a takeover of a worker
    that was not dead after all) is canceled at once and listed in ``duplicate_batch_ids``.
    """
    fields = {
        "state": LedgerState.SUBMITTED.value,
        "submitted_at": rfc3339(utc_now()),
        **batch_fields(batch),
        **extra,
    }

    def change(current: dict[str, Any]) -> dict[str, Any] | None:
        if recorded(current) and current.get("batch_id") != batch.id:
            return None
        return {**current, **fields}

    try:
        entry_now, written = cas_update(path, change)
    except FileNotFoundError:
        # Deleted by hand while we submitted: the batch exists, so it must be on record.
        storage.create_if_absent(path, encode_entry({**entry, **fields}))
        entry_now, written = cas_update(path, change)
    if written:
        return handle_from_entry(entry_now, path)
    log.error(
        "Batch %s was recorded for this chunk by another worker (%s) while this one submitted %s.",
        entry_now.get("batch_id") or entry_now.get("sync_run_id"),
        entry_now.get("owner"),
        batch.id,
    )
    if created_here:
        try:
            hook.cancel_batch(batch.id)
            log.warning("Canceled the duplicate batch %s.", batch.id)
        except Exception as exc:
            log.error("Could not cancel the duplicate batch %s: %s; cancel it in the Console.", batch.id, exc)
        entry_now = cas_update(path, lambda e: add_ids(e, "duplicate_batch_ids", batch.id))[0]
    return handle_from_entry(entry_now, path)


def _was_fully_canceled(hook: AnthropicBatchHook, entry: dict[str, Any]) -> bool:
    """Whether the recorded batch ended fully canceled, so the chunk may be submitted anew.

    Unknown (API trouble) counts as no, and so does a batch a user canceled on the Batches page:
    that was a decision not to pay for those requests (``cancel.py``).
    """
    if entry.get("cancel_reason") == CancelReason.USER:
        return False
    if is_fully_canceled(entry):
        return True
    if entry.get("processing_status") == ProcessingStatus.ENDED:
        return False
    try:
        return is_fully_canceled(hook.get_batch(entry["batch_id"]))
    except Exception as exc:
        log.warning("Could not check batch %s before re-attaching: %s", entry["batch_id"], exc)
        return False


def _recover_orphan(
    hook: AnthropicBatchHook,
    ledger: SubmissionLedger,
    path: ObjectStoragePath,
    entry: dict[str, Any],
    n_requests: int,
    settle_seconds: float,
    reason: str = "the previous attempt died during submission",
) -> tuple[MessageBatch | None, bool]:
    """The batch an interrupted create made and whether its identity is verified; (None, False) if
    it made none; raises if ambiguous.

    Candidates: batches created since the create started (minus :data:`CLOCK_SKEW`) with the same
    request count that no ledger entry (any DAG, date, task or chunk) has recorded. Ended candidates
    are verified at once (every result line must answer a request of this chunk); an unended one can
    only be verified when it ends, which collect does before anything is written.
    """
    started = parse_rfc3339(entry.get("create_started_at") or entry["intent_at"])
    since = started - CLOCK_SKEW
    chunk_path = entry["chunk_path"]
    log.warning(
        "Ledger %s holds only an intent (create started %s): %s. Looking for a batch of %d requests "
        "created since %s.",
        path,
        entry.get("create_started_at") or entry["intent_at"],
        reason,
        n_requests,
        rfc3339(since),
    )

    def candidates() -> list[MessageBatch]:
        known = ledger.known_batch_ids()
        current = ledger.read(path) or {}
        known.update(current.get("foreign_batch_ids") or [])
        return resolve_orphans(hook.find_orphan_batches(since, n_requests), known)

    found = candidates()
    wait = (started + timedelta(seconds=settle_seconds) - utc_now()).total_seconds()
    if not found and wait > 0:
        log.info("No batch listed yet; the create is recent, listing again in %.0fs.", wait)
        time.sleep(wait)
        found = candidates()
    verified: list[MessageBatch] = []
    pending: list[MessageBatch] = []
    for batch in found:
        if batch.processing_status != ProcessingStatus.ENDED:
            pending.append(batch)
        elif batch.archived_at is not None:
            log.info("Batch %s is archived; its results cannot prove it is ours. Skipping it.", batch.id)
        elif _is_ours(hook, batch.id, chunk_path):
            verified.append(batch)
        else:
            cas_update(path, lambda e, batch_id=batch.id: add_ids(e, "foreign_batch_ids", batch_id))
    if len(verified) == 1:
        return verified[0], True
    if len(verified) > 1 or len(pending) > 1:
        raise AmbiguousSubmissionError(ambiguity_message(path, verified or pending, n_requests))
    if pending:
        return pending[0], False
    log.info("No batch from the interrupted attempt exists: it never took effect. Submitting.")
    return None, False


# -- the steps the submitting operators share ---------------------------------------------------
#: Rough bytes per input token for the projection (JSON-escaped English text runs at ~4).
BYTES_PER_TOKEN = 4


def find_chunk(manifest: Manifest, chunk_path: str) -> ChunkInfo:
    """The manifest's ChunkInfo for ``chunk_path`` (matched by full path, else by file name)."""
    wanted = str(storage.as_path(chunk_path))
    for chunk in manifest.chunks:
        if str(storage.as_path(chunk.path)) == wanted:
            return chunk
    name = wanted.rsplit("/", 1)[-1]
    matches = [c for c in manifest.chunks if c.path.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"Chunk {chunk_path} is not in the manifest ({len(manifest.chunks)} chunks listed).")


def submission_identity(ti: Any, manifest: Manifest) -> dict[str, Any]:
    """Who submits what, as the ledger keys it: the task instance and the run in ``manifest``."""
    return {
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": ti.run_id,
        "map_index": -1 if getattr(ti, "map_index", None) is None else int(ti.map_index),
        "partition": str(manifest.spec.partition),
        "pipeline": str(manifest.spec.pipeline),
        "mode": manifest.mode,
    }


def projected_cost_usd(model: str, n_requests: int, n_bytes: int, max_tokens: int | None) -> float | None:
    """Upper-bound batch cost: input ~ bytes/4 tokens, every answer using its full max_tokens."""

    try:
        table = load_price_table()
        usage = {"input_tokens": n_bytes // BYTES_PER_TOKEN, "output_tokens": n_requests * (max_tokens or 0)}
        return round(table.cost(model, usage, batch=True), 4)
    except Exception:  # an unknown model must not block the submission; the report shows real cost
        return None
