"""The synchronous mode as a backend: answer one chunk through the Messages API, now.

:func:`submission.submit_idempotently` hands every ``mode="sync"`` submission to :func:`run_chunk`. It
writes batch-format result lines (``sync_runner``) to ``{work_dir}/sync/chunk-NNNNN.results.jsonl``
and records the chunk's run in its ledger entry as ``sync_run_id`` ``sync_<fingerprint[:24]>`` (no
``batch_id``: it is no batch). Its BatchHandle has ``mode="sync"``: the wait returns at once, the
links show no Console page, collect reads the results file.

**Crash-resume in parts.** Progress is persisted while the chunk runs, every ``part_every_answers``
answers or ``part_every_seconds`` seconds, as ``{work_dir}/sync/chunk-NNNNN/part-MMMMM.jsonl``, each
one complete file written in a single atomic write through ``storage`` (one PUT on an object store,
so it is visible the moment it is written; an appended file would not be until closed). A rerun
lists the parts (``ObjectStoragePath.glob``) and the final file, skips every custom_id answered
there, and pays only for the rest; a crash loses at most the answers of one part interval. The final
file is the parts concatenated (each custom_id once); then the parts are removed.

**Taking over batches in flight.** ``mode=sync`` on a date whose chunk already has a batch (the
ledger entry of the same chunk fingerprint, so the very same requests) does not wait for it:

1. the batch is canceled (if it has not ended) and watched until it ends, up to
   ``cancel_wait_seconds``;
2. every answer it produced (its ``succeeded`` result lines) is kept as
   ``sync/chunk-NNNNN/batch-<batch_id>.jsonl`` and counts as answered: it is not asked again;
3. only the rest is sent synchronously.

Nothing is then paid twice. Only if the cancellation does not finish within ``cancel_wait_seconds``
are the remaining requests sent without waiting; the batch may still finish some of them (the
requests the cancel could not stop), and those are paid twice. They are counted when the batch has
ended by the end of the run (looked at again, up to ``overlap_wait_seconds``) and reported in
``sync/chunk-NNNNN/takeover.json`` and in the run summary (``sync_takeover``, see
:func:`takeover_summary`); a batch still not ended then is reported as unresolved. The ledger entry
keeps the batch id in ``previous_batch_ids`` and ``taken_over_batch_ids``.

Reused batch answers were billed at the batch price: :func:`reprice_batch_answers` (called by
collect) prices those rows accordingly; the rest of a sync chunk is priced at list price.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from anthropic_batch import storage
from anthropic_batch.contracts import BatchHandle, sync_run_id_for
from anthropic_batch.ledger import (
    LedgerState,
    SubmissionLedger,
    handle_from_entry,
    intent_fields,
    recorded,
    rfc3339,
    sync_results_path,
    update_entry,
    utc_now,
)
from anthropic_batch.status import REQUEST_COUNT_KEYS, ProcessingStatus, ResultType
from anthropic_batch.storage import PathLike, as_path

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from anthropic_batch.hooks import AnthropicBatchHook
    from anthropic_batch.pricing import PriceTable

# hooks, sync_runner (the anthropic SDK) and pyarrow are imported inside the functions that use
# them: publish (imported at DAG parse time) imports this module.

log = logging.getLogger(__name__)

#: Persist progress after this many answers...
PART_EVERY_ANSWERS = 100
#: ...or after this many seconds with at least one new answer, whichever comes first.
PART_EVERY_SECONDS = 30.0
#: How long to wait for a canceled batch to end before answering its remaining requests anyway.
CANCEL_WAIT_SECONDS = 300.0
#: After answering, how long to wait for a batch that had not ended in time, to count what was paid twice.
OVERLAP_WAIT_SECONDS = 60.0
TAKEOVER_FILE = "takeover.json"
_PART_PREFIX = "part-"
_BATCH_PREFIX = "batch-"


# -- paths -----------------------------------------------------------------------------------------
def parts_dir(results_path: PathLike) -> ObjectStoragePath:
    """``{work_dir}/sync/chunk-NNNNN/`` for ``{work_dir}/sync/chunk-NNNNN.results.jsonl``."""
    path = as_path(results_path)
    return path.parent / path.name.removesuffix(".results.jsonl")


def _listed(directory: ObjectStoragePath, prefix: str) -> list[ObjectStoragePath]:
    """Files ``{prefix}*.jsonl`` in ``directory`` (sorted; temporaries of an atomic write skipped)."""
    if not directory.exists():
        return []
    return sorted(
        (p for p in directory.glob(f"{prefix}*.jsonl") if storage.TMP_MARKER not in p.name),
        key=lambda p: p.name,
    )


# -- reading what is answered ------------------------------------------------------------------------
def _complete_lines(path: PathLike) -> list[bytes]:
    """Complete result lines of a file (a torn or undecodable line is dropped); none if absent."""
    try:
        with storage.open_binary(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            json.loads(raw)
        except ValueError:
            continue
        lines.append(raw)
    return lines


def answered_lines(results_path: PathLike) -> dict[str, bytes]:
    """Every answer already on storage for a chunk, each custom_id once (first seen wins).

    Read in this order: the final results file (a crash after writing it, before the ledger said
    so), reused batch answers, the parts, and the ``.partial`` file of the earlier single-file format.
    """
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import custom_id_of

    results = as_path(results_path)
    directory = parts_dir(results)
    sources: list[PathLike] = [
        results,
        *_listed(directory, _BATCH_PREFIX),
        *_listed(directory, _PART_PREFIX),
        results.parent / f"{results.name}.partial",
    ]
    done: dict[str, bytes] = {}
    for source in sources:
        for line in _complete_lines(source):
            done.setdefault(custom_id_of(line), line)
    return done


def count_results(lines: Iterable[bytes]) -> dict[str, int]:
    """``request_counts`` of result lines (the API's buckets)."""
    counts = dict.fromkeys(REQUEST_COUNT_KEYS, 0)
    for line in lines:
        kind = json.loads(line)["result"]["type"]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _iter_chunk_requests(chunk_path: PathLike, skip: set[str]) -> Iterator[dict[str, Any]]:
    # batch_requests imports Airflow (ObjectStoragePath): this module stays without it
    from anthropic_batch.batch_requests import iter_chunk_requests

    for request in iter_chunk_requests(chunk_path):
        if request["custom_id"] not in skip:
            yield request


# -- writing progress in parts -------------------------------------------------------------------------
class PartWriter:
    """Buffers answers and writes them as ``part-MMMMM.jsonl`` files, each in one atomic write."""

    def __init__(
        self,
        directory: ObjectStoragePath,
        *,
        every_answers: int = PART_EVERY_ANSWERS,
        every_seconds: float = PART_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.every_answers = max(1, every_answers)
        self.every_seconds = every_seconds
        self._clock = clock
        existing = _listed(directory, _PART_PREFIX)
        # Numbering continues after the parts of an earlier try, so none is overwritten.
        self.next_index = 1 + max((_part_index(p.name) for p in existing), default=-1)
        self.buffer: list[bytes] = []
        self.since = clock()
        self.written: list[ObjectStoragePath] = []

    def add(self, line: bytes) -> None:
        self.buffer.append(line)
        if len(self.buffer) >= self.every_answers or self._clock() - self.since >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            path = self.directory / f"{_PART_PREFIX}{self.next_index:05d}.jsonl"
            storage.atomic_write_bytes(path, b"".join(line + b"\n" for line in self.buffer))
            self.written.append(path)
            self.next_index += 1
            self.buffer = []
        self.since = self._clock()


def _part_index(name: str) -> int:
    try:
        return int(name.removeprefix(_PART_PREFIX).removesuffix(".jsonl"))
    except ValueError:
        return -1


# -- taking over a batch of the same chunk ---------------------------------------------------------
def _wait_ended(
    hook: AnthropicBatchHook, batch_id: str, timeout_s: float, sleep: Callable[[float], None]
) -> Any:
    """The batch once ended, or its last state when ``timeout_s`` passed first (polled with backoff)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        batch = hook.get_batch(batch_id)
        remaining = deadline - time.monotonic()
        if batch.processing_status == ProcessingStatus.ENDED or remaining <= 0:
            return batch
        sleep(min(delay, remaining))
        delay = min(delay * 2, 10.0)


def _succeeded_lines(hook: AnthropicBatchHook, batch_id: str) -> list[bytes]:
    """The batch's answers: its ``succeeded`` result lines (what was paid for)."""
    return [
        line
        for line in hook.iter_result_lines(batch_id)
        if json.loads(line)["result"]["type"] == ResultType.SUCCEEDED
    ]


def _take_over(
    hook: AnthropicBatchHook,
    entry: Mapping[str, Any],
    results_path: ObjectStoragePath,
    *,
    cancel_wait_seconds: float,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    """Cancel the chunk's batch, keep its answers; returns the takeover record (see module doc)."""
    batch_id = str(entry["batch_id"])
    batch = hook.get_batch(batch_id)
    status_before = batch.processing_status
    if status_before != ProcessingStatus.ENDED:
        log.warning(
            "mode=sync: batch %s of this chunk is %s; canceling it and answering the rest now.",
            batch_id,
            status_before,
        )
        if status_before == ProcessingStatus.IN_PROGRESS:
            try:
                hook.cancel_batch(batch_id)
            except Exception as exc:  # e.g. it ended meanwhile; what it answered is what counts
                log.warning("Cancel of batch %s failed (%s); waiting for it to end.", batch_id, exc)
        batch = _wait_ended(hook, batch_id, cancel_wait_seconds, sleep)
    record: dict[str, Any] = {
        "batch_id": batch_id,
        "status_at_takeover": status_before,
        "canceled_by_takeover": status_before != ProcessingStatus.ENDED,
        "taken_over_at": rfc3339(utc_now()),
        "n_reused": 0,
        "ended_in_time": batch.processing_status == ProcessingStatus.ENDED,
        "n_paid_twice": 0,
        "paid_twice_custom_ids": [],
        "unresolved": False,
    }
    if batch.processing_status == ProcessingStatus.ENDED:
        reused = _succeeded_lines(hook, batch_id)
        # Written before the ledger changes: a crash in between takes the batch over again, harmlessly.
        storage.atomic_write_bytes(
            parts_dir(results_path) / f"{_BATCH_PREFIX}{batch_id}.jsonl",
            b"".join(line + b"\n" for line in reused),
        )
        record["n_reused"] = len(reused)
        record["request_counts"] = batch.request_counts.model_dump(mode="json")
        log.info("Reusing %d answer(s) of batch %s (%s).", len(reused), batch_id, record["request_counts"])
    else:
        log.warning(
            "Batch %s is still %s after %.0fs; answering its requests now. Those it still finishes "
            "(the cancel could not stop them) will be paid twice and are reported.",
            batch_id,
            batch.processing_status,
            cancel_wait_seconds,
        )
    return record


def _resolve_overlap(
    hook: AnthropicBatchHook,
    record: dict[str, Any],
    answered_now: set[str],
    *,
    wait_seconds: float,
    sleep: Callable[[float], None],
) -> None:
    """For a batch that had not ended at takeover: which requests it answered that we paid again."""
    try:
        batch = _wait_ended(hook, record["batch_id"], wait_seconds, sleep)
        if batch.processing_status != ProcessingStatus.ENDED:
            record["unresolved"] = True
            return
        twice = sorted(
            cid
            for cid in (json.loads(line)["custom_id"] for line in _succeeded_lines(hook, record["batch_id"]))
            if cid in answered_now
        )
    except Exception as exc:  # the answers are in; an accounting look-up must not fail the chunk
        log.warning("Could not check batch %s for requests paid twice: %s", record["batch_id"], exc)
        record["unresolved"] = True
        return
    record["n_paid_twice"] = len(twice)
    record["paid_twice_custom_ids"] = twice
    if twice:
        log.warning(
            "%d request(s) were answered by both batch %s and the synchronous run.",
            len(twice),
            record["batch_id"],
        )


# -- the backend ---------------------------------------------------------------------------------------
def run_chunk(
    hook: AnthropicBatchHook,
    ledger: SubmissionLedger,
    path: ObjectStoragePath,
    entry: dict[str, Any] | None,
    *,
    identity: Mapping[str, Any],
    concurrency: int = 8,
    part_every_answers: int | None = None,
    part_every_seconds: float | None = None,
    cancel_wait_seconds: float | None = None,
    overlap_wait_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    fresh: bool = False,
) -> BatchHandle:
    """
    Answer a chunk synchronously and return its BatchHandle; see the module docstring.

    :param path: the chunk's ledger entry path, which this worker owns (``submission.submit_idempotently``
        claimed it); ``entry`` the entry to act on: the claimed intent, or the batch entry that was
        taken over. Writes merge into the entry (compare-and-swap), keeping the owner's fields.
    :param fresh: the intent was just created (not a dead worker's): files left under this chunk
        index belong to another version of it and are cleared.
    :param identity: the ledger fields of the submission: dag_id, task_id, run_id, map_index,
        partition, pipeline, attempt, chunk_path, chunk_fingerprint, n_requests, n_bytes, model,
        projected_cost_usd.
    :param part_every_answers: persist progress after this many answers (default
        :data:`PART_EVERY_ANSWERS`), or ``part_every_seconds`` (:data:`PART_EVERY_SECONDS`).
    :param cancel_wait_seconds: how long to wait for a taken-over batch to end after the cancel
        (:data:`CANCEL_WAIT_SECONDS`); ``overlap_wait_seconds`` (:data:`OVERLAP_WAIT_SECONDS`): how
        long, after answering, to wait for one that had not, to count the requests paid twice.
    """
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.sync_runner import run_requests_sync

    # Module constants read at call time (not bound as defaults), so a deployment can tune them.
    part_every_answers = part_every_answers or PART_EVERY_ANSWERS
    part_every_seconds = PART_EVERY_SECONDS if part_every_seconds is None else part_every_seconds
    cancel_wait_seconds = CANCEL_WAIT_SECONDS if cancel_wait_seconds is None else cancel_wait_seconds
    overlap_wait_seconds = OVERLAP_WAIT_SECONDS if overlap_wait_seconds is None else overlap_wait_seconds

    chunk_path = str(identity["chunk_path"])
    if entry and recorded(entry) and entry.get("mode") == "sync":
        log.info(
            "Chunk answered synchronously before (%s); re-attaching, nothing is sent.",
            entry.get("sync_run_id"),
        )
        if entry.get("chunk_path") != chunk_path:
            entry = update_entry(path, chunk_path=chunk_path)
        return handle_from_entry(entry, path)

    results_path = sync_results_path(chunk_path)
    takeovers: list[dict[str, Any]] = []
    resuming = not fresh and bool(
        entry and entry.get("mode") == "sync" and entry.get("state") == LedgerState.INTENT
    )
    if not resuming:
        # Files under this chunk index without a sync intent of this fingerprint are another version's.
        _clear_chunk_files(results_path)
    if entry and entry.get("batch_id"):  # a batch of these very requests: take it over
        previous = [*(entry.get("previous_batch_ids") or []), entry["batch_id"]]
        takeovers.append(
            _take_over(hook, entry, results_path, cancel_wait_seconds=cancel_wait_seconds, sleep=sleep)
        )
        entry = update_entry(
            path,
            **intent_fields(**{**identity, "mode": "sync"}, previous_batch_ids=previous),
            taken_over_batch_ids=[*(entry.get("taken_over_batch_ids") or []), entry["batch_id"]],
        )
        _write_takeovers(results_path, takeovers)
    elif resuming:
        takeovers = _read_takeovers(results_path)  # an interrupted run of this chunk: resume it
    else:
        previous = list((entry or {}).get("previous_batch_ids") or [])
        entry = update_entry(
            path, **intent_fields(**{**identity, "mode": "sync"}, previous_batch_ids=previous)
        )

    done = answered_lines(results_path)
    if done:
        log.info(
            "%d of %d requests of %s already answered; not asked again.",
            len(done),
            entry["n_requests"],
            chunk_path,
        )
    writer = PartWriter(
        parts_dir(results_path), every_answers=part_every_answers, every_seconds=part_every_seconds
    )
    answered_now: set[str] = set()
    client = hook.get_conn()
    try:
        for line in run_requests_sync(
            _iter_chunk_requests(chunk_path, set(done)), client, concurrency=concurrency
        ):
            writer.add(line)
            record = json.loads(line)
            done[record["custom_id"]] = line
            if record["result"]["type"] == ResultType.SUCCEEDED:
                answered_now.add(record["custom_id"])
    finally:
        writer.flush()  # whatever was answered before an error is kept for the retry

    with storage.open_atomic_writer(results_path) as final:
        for line in done.values():
            final.write(line + b"\n")
    # Superseded by the final file (reused batch answers stay: collect prices them).
    for part in [
        *_listed(parts_dir(results_path), _PART_PREFIX),
        results_path.parent / f"{results_path.name}.partial",
    ]:
        if part.exists():
            part.unlink()

    for record in takeovers:
        if not record["ended_in_time"] and not record.get("checked"):
            _resolve_overlap(hook, record, answered_now, wait_seconds=overlap_wait_seconds, sleep=sleep)
            record["checked"] = True
    if takeovers:
        _write_takeovers(results_path, takeovers)

    now = rfc3339(utc_now())
    counts = count_results(done.values())
    entry = update_entry(
        path,
        state=LedgerState.ENDED.value,
        batch_id=None,
        sync_run_id=sync_run_id_for(str(identity["chunk_fingerprint"])),
        submitted_at=entry.get("submitted_at") or now,
        processing_status=ProcessingStatus.ENDED.value,
        request_counts=counts,
        created_at=entry.get("intent_at"),
        ended_at=now,
        results_path=str(results_path),
        n_reused_from_batches=sum(r["n_reused"] for r in takeovers),
        n_paid_twice=sum(r["n_paid_twice"] for r in takeovers),
    )
    log.info("Synchronous run of %s done: %s -> %s.", chunk_path, counts, results_path)
    return handle_from_entry(entry, path)


def _clear_chunk_files(results_path: ObjectStoragePath) -> None:
    """Remove a chunk's sync files (final, legacy partial, parts, batch answers, takeover record)."""
    directory = parts_dir(results_path)
    stale = [results_path, results_path.parent / f"{results_path.name}.partial"]
    if directory.exists():
        stale += [p for p in directory.iterdir() if p.is_file()]
    for path in stale:
        if path.exists():
            log.info("Removing %s, left by a run of other requests under this chunk index.", path)
            path.unlink()


def _write_takeovers(results_path: PathLike, takeovers: list[dict[str, Any]]) -> None:
    storage.atomic_write_json(parts_dir(results_path) / TAKEOVER_FILE, {"takeovers": takeovers})


def _read_takeovers(results_path: PathLike) -> list[dict[str, Any]]:
    return list((storage.read_json(parts_dir(results_path) / TAKEOVER_FILE) or {}).get("takeovers") or [])


# -- for collect and publish ----------------------------------------------------------------------
def batch_priced_ids(results_path: PathLike) -> set[str]:
    """custom_ids of a sync chunk whose answers were reused from a batch (billed at batch price)."""
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import custom_id_of

    return {
        custom_id_of(line)
        for part in _listed(parts_dir(results_path), _BATCH_PREFIX)
        for line in _complete_lines(part)
    }


def reprice_batch_answers(parquet_path: PathLike, results_path: PathLike, prices: PriceTable) -> float | None:
    """Rows of a collected sync chunk that came from a taken-over batch get the batch price.

    Rewrites the Parquet file (atomically) only when there are such rows; returns the file's new
    total ``cost_usd``, or None when nothing changed.
    """
    ids = batch_priced_ids(results_path)
    if not ids:
        return None
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow as pa
    import pyarrow.compute as pc

    table = storage.read_parquet(parquet_path)
    reused = pc.is_in(table["custom_id"], value_set=pa.array(sorted(ids), pa.string()))
    batch_cost = pc.multiply(table["sync_cost_usd"], float(prices.batch_discount))
    cost = pc.if_else(reused, batch_cost, table["cost_usd"])
    index = table.schema.get_field_index("cost_usd")
    table = table.set_column(index, table.schema.field(index), cost.cast(table.schema.field(index).type))
    storage.write_parquet_atomic(parquet_path, table)
    return float(pc.sum(table["cost_usd"]).as_py() or 0.0)


def takeover_summary(work_dir: PathLike) -> dict[str, Any] | None:
    """The run summary's ``sync_takeover`` block: batches taken over by ``mode=sync``; None if none."""
    records = [
        record
        for path in sorted(as_path(work_dir).glob("sync/*/" + TAKEOVER_FILE), key=str)
        for record in (storage.read_json(path) or {}).get("takeovers") or []
    ]
    if not records:
        return None
    return {
        "batch_ids": [r["batch_id"] for r in records],
        "n_reused_answers": sum(int(r.get("n_reused") or 0) for r in records),
        "n_paid_twice": sum(int(r.get("n_paid_twice") or 0) for r in records),
        "paid_twice_custom_ids": sorted(c for r in records for c in r.get("paid_twice_custom_ids") or []),
        "unresolved_batch_ids": [r["batch_id"] for r in records if r.get("unresolved")],
    }
