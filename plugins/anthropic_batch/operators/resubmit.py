"""ResubmitFailuresOperator: retry what can be retried, then one final row per request.

One task runs every retry round of a run:

1. merge the collected attempts into ``work_dir/results/merged.parquet``, keeping each request's
   *best* answer (valid beats invalid, complete beats truncated, any answer beats an error; see
   ``results.merge_attempts``), with a ``missing`` row for any prepared request no attempt
   returned. The merge streams (bounded memory) and also writes the retry list
   (``results/retry.parquet``) and the dead letters;
2. a fatal failure (authentication / permission / billing) fails the task at once, loudly, and
   without retries (they would fail the same way); what was collected so far stays on storage;
3. retriable rows (expired, canceled, missing, invalid output, overloaded / rate-limited / server
   errors, and answers cut off at ``max_tokens`` when ``retry_truncated``) that have had fewer than
   ``max_attempts`` attempts, and whose last try did not fail permanently, go into retry chunks
   ``work_dir/requests/retry-NN/retry-NN-chunk-NNNNN.jsonl`` made of their last submitted request
   lines, byte for byte, except that ``max_tokens`` is multiplied by ``max_tokens_growth`` when the
   last answer was truncated. Truncation retry (``retry_truncated``) defaults to on with an output
   model (a cut-off JSON answer is rarely usable) and off for free text (a cut-off text is an
   answer: paying again is the pipeline's choice); a retry never loses the answer it tries to
   improve, because the merge keeps the best one;
4. each retry chunk is submitted through ``submission.submit_idempotently`` (so a retried task re-attaches
   instead of paying twice), one at a time and each after queue admission
   (:mod:`anthropic_batch.queue_budget`; the task defers while it waits), so the task's one pool slot
   stands for one batch; the task then *defers* on ``BatchPollTrigger`` (no worker slot held while
   the batch runs) and resumes, as a fresh operator instance, in ``execute_complete``; it collects
   into ``results/attempt-NN/`` and goes back to 1. In ``mode=sync`` the retry runs synchronously and
   nothing is deferred;

   The loop's state (attempt number, result files so far, the awaited and pending handles, the
   rounds so far) lives in ``work_dir/results/resubmit-state.json``, written atomically before each
   deferral; ``execute_complete`` restores it from there and only needs the trigger's event. The
   deferral kwargs are not used: ``dag.test()`` drops them (it resumes with ``{"event": ...}``
   only), and storage is one place to look. ``execute()`` always starts a new state, so a state
   file left by an earlier run of the partition is never resumed;
5. when nothing is left to retry: ``merged.parquet`` has exactly one row per prepared request
   (checked) and ``work_dir/dead_letter.parquet`` holds the rows that failed permanently or ran out
   of attempts, with the reason.

The ledger key of a retry chunk is the hash of its bytes *and* its attempt number: a request that
fails twice the same way yields an identical chunk, which must still be a new submission.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context, ObjectStoragePath
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from anthropic_batch import layout, queue_budget, storage
from anthropic_batch.answer_reuse import merge_inputs
from anthropic_batch.batch_requests import (
    DEFAULT_MAX_BYTES_PER_CHUNK,
    MAX_REQUESTS_PER_BATCH,
    body_size,
    canonical_json,
    iter_chunk_lines,
    read_manifest,
    sha256_hex,
    write_chunk,
)
from anthropic_batch.collection import collect_batch, write_merge_record
from anthropic_batch.contracts import BatchHandle, ChunkInfo, Manifest
from anthropic_batch.layout import (  # noqa: F401  (re-exported: the resubmit loop's paths)
    RESUBMIT_STATE_FILE,
    RETRY_LIST_FILE,
    merge_record_path,
    resubmit_state_path,
    retry_dir,
)
from anthropic_batch.ledger import SubmissionLedger, ledger_root_for, read_entry
from anthropic_batch.sensors import admit_or_defer, raise_for_admission_event
from anthropic_batch.status import DEFAULT_CONN_ID, ProcessingStatus
from anthropic_batch.submission import submission_identity, submit_idempotently
from anthropic_batch.triggers import BatchPollTrigger

if TYPE_CHECKING:
    from anthropic_batch.results import MergeStats

# pyarrow, results (pyarrow) and hooks (the anthropic SDK) are imported inside the methods that use
# them: DAG files import this module at parse time.

log = logging.getLogger(__name__)

#: Upper bound for a grown ``max_tokens`` (the largest output any current model accepts); beyond a
#: model's own limit the API answers invalid_request_error, which is dead-lettered, not retried.
MAX_TOKENS_CAP = 128_000


def task_identity(context: Context) -> dict[str, Any]:
    """The task instance a resubmit state belongs to (a state is resumed only by the same one)."""
    ti = context["ti"]
    map_index = getattr(ti, "map_index", None)
    return {
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": ti.run_id,
        "map_index": -1 if map_index is None else int(map_index),
    }


def grow_max_tokens(line: bytes, growth: float, cap: int = MAX_TOKENS_CAP) -> bytes:
    """The request line with ``params.max_tokens`` multiplied by ``growth`` (rounded up, capped)."""
    request = json.loads(line)
    params = request["params"]
    params["max_tokens"] = min(cap, max(params["max_tokens"] + 1, math.ceil(params["max_tokens"] * growth)))
    return (
        '{"custom_id":' + json.dumps(request["custom_id"]) + ',"params":' + canonical_json(params) + "}"
    ).encode()


def _chunk_groups(lines: Iterable[bytes], max_requests: int, max_bytes: int) -> Iterator[Iterator[bytes]]:
    """Split a stream of request lines into consecutive groups within the batch limits, streamed.

    Each group must be consumed before the next is asked for (``write_chunk`` does).
    """
    source = iter(lines)
    carry: list[bytes | None] = [next(source, None)]  # the line that did not fit the previous group

    def group() -> Iterator[bytes]:
        n = total = 0
        line = carry[0]
        while line is not None:
            if n and (n + 1 > max_requests or body_size(n + 1, total + len(line)) > max_bytes):
                carry[0] = line
                return
            yield line
            n, total = n + 1, total + len(line)
            line = next(source, None)
        carry[0] = None

    while carry[0] is not None:
        yield group()


def _iter_retry_list(path: storage.PathLike) -> Iterator[Any]:
    """The retry list's record batches, one row group at a time."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.parquet as pq

    with storage.open_binary(path) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=20_000, use_threads=False)


class ResubmitFailuresOperator(BaseOperator):
    """
    Merge the collected attempts, resubmit retriable failures (deferring while they run), finalise.

    :param results_paths: the attempt-1 results Parquet paths (output of the collect tasks).
    :param work_dir: the run's work directory (templated).
    :param conn_id: the Anthropic connection.
    :param max_attempts: attempts per request in all, the first one included.
    :param max_tokens_growth: ``max_tokens`` factor for answers truncated at ``max_tokens``.
    :param retry_truncated: resubmit answers cut off at ``max_tokens`` (with a larger max_tokens);
        ``None`` (default): on when the run has an output model, off for free text.
    :param poll_interval: first seconds between polls of a retry batch (grows toward max_poll_interval).
    :param max_poll_interval: the longest wait between polls.
    :param deadline_hours: how long to wait for one retry batch before failing the task (a retry of
        the task re-attaches to the same batch).
    :param storage_root: root of the ledger; default: derived from ``work_dir``'s layout.
    :returns: the merged results Parquet path.
    """

    template_fields: Sequence[str] = ("results_paths", "work_dir", "storage_root")
    ui_color = "#fcf3cf"

    def __init__(
        self,
        *,
        results_paths: Sequence[str] | Any,
        work_dir: str,
        conn_id: str = DEFAULT_CONN_ID,
        max_attempts: int = 3,
        max_tokens_growth: float = 2.0,
        retry_truncated: bool | None = None,
        poll_interval: float = 30,
        max_poll_interval: float = 600,
        deadline_hours: float = 30,
        storage_root: str | None = None,
        max_requests_per_chunk: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_chunk: int = DEFAULT_MAX_BYTES_PER_CHUNK,
        queue_budget_requests: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if max_tokens_growth < 1:
            raise ValueError(f"max_tokens_growth must be >= 1, got {max_tokens_growth}")
        self.results_paths = results_paths
        self.work_dir = work_dir
        self.conn_id = conn_id
        self.max_attempts = max_attempts
        self.max_tokens_growth = max_tokens_growth
        self.retry_truncated = retry_truncated
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.deadline_hours = deadline_hours
        self.storage_root = storage_root
        self.max_requests_per_chunk = max_requests_per_chunk
        self.max_bytes_per_chunk = max_bytes_per_chunk
        # Queue budget (issue 9): retry batches are submitted one at a time, each admitted first.
        self.queue_budget_requests = queue_budget_requests

    # -- entry points ----------------------------------------------------------------------------
    def execute(self, context: Context) -> str:
        paths = [str(p) for p in (self.results_paths or []) if p]
        # A new loop: overwrite whatever state an earlier run of this partition left behind, so it
        # can never be resumed by mistake (the ledger, not this file, makes re-attaching safe).
        self._save_state(context, "started", attempt=1, results_paths=paths, rounds=[])
        self.log.info("Merging %d collected result file(s) of attempt 1.", len(paths))
        return self._round(context, paths, attempt=1, rounds=[])

    def execute_complete(self, context: Context, event: Mapping[str, Any], **_deferral_kwargs: Any) -> str:
        """Resume after a retry batch's trigger fired: collect it, wait for the next, or go on.

        The loop's state comes from ``resubmit-state.json``, not from the deferral kwargs (which
        ``dag.test()`` drops); any kwargs given are ignored.
        """
        state = self._load_state(context)
        handle = BatchHandle.of(state["handle"])
        attempt = int(state["attempt"])
        if event.get("batch_id") != handle.batch_id:
            raise AirflowException(
                f"The trigger reported on batch {event.get('batch_id')} but the resubmit state "
                f"({resubmit_state_path(self.work_dir)}) awaits {handle.batch_id} (attempt {attempt}). "
                f"Clear this task to start the resubmit loop again; the ledger re-attaches to "
                f"batches already submitted."
            )
        status = event.get("status")
        if status != ProcessingStatus.ENDED:
            raise AirflowException(
                f"Retry batch {handle.batch_id} (attempt {attempt}) did not end: {status}: "
                f"{event.get('message')}. A retry of this task re-attaches to the same batch."
            )
        rounds = list(state.get("rounds") or [])
        paths = [*state["results_paths"], self._collect(handle, attempt)]
        # -- queue budget (budget branch): the ended batch frees its ticket; next retry chunk --
        queue_budget.TicketQueue().release_owned(
            queue_budget.ticket_owner(submission_identity(context["ti"], read_manifest(self.work_dir))),
            str(handle.ledger_path),
        )
        pending = list(state.get("pending") or [])
        if pending:
            return self._submit_next(context, attempt, paths, pending, rounds)
        return self._round(context, paths, attempt, rounds)

    def admission_complete(self, context: Context, event: Any = None, **_kwargs: Any) -> str:
        """Resume after waiting for queue admission: check again, submit the next retry chunk."""
        raise_for_admission_event(event)
        state = self._load_state(context, phase="admission")
        return self._submit_next(
            context,
            int(state["attempt"]),
            list(state["results_paths"]),
            list(state.get("pending") or []),
            list(state.get("rounds") or []),
        )

    # -- the loop's state on storage -----------------------------------------------------------------
    def _save_state(
        self,
        context: Context,
        phase: str,
        *,
        attempt: int,
        results_paths: Sequence[str],
        rounds: Sequence[Mapping[str, Any]],
        handle: Mapping[str, Any] | None = None,
        pending: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        storage.atomic_write_json(
            resubmit_state_path(self.work_dir),
            {
                **task_identity(context),
                "phase": phase,
                "attempt": attempt,
                "results_paths": list(results_paths),
                "handle": dict(handle) if handle is not None else None,
                "pending": [dict(h) for h in pending],
                "rounds": [dict(r) for r in rounds],
                "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    def _load_state(self, context: Context, phase: str = "waiting") -> dict[str, Any]:
        """The state saved before the deferral this resume answers; a clear error if it is not there."""
        path = resubmit_state_path(self.work_dir)
        state = storage.read_json(path)
        if not isinstance(state, dict):
            raise AirflowException(
                f"No resubmit state at {path}: cannot resume the resubmit loop. Clear this task to "
                f"start it again; the ledger re-attaches to batches already submitted."
            )
        identity = task_identity(context)
        theirs = {k: state.get(k) for k in identity}
        missing_handle = phase == "waiting" and not state.get("handle")
        if theirs != identity or state.get("phase") != phase or missing_handle:
            raise AirflowException(
                f"The resubmit state at {path} ({state.get('phase')}, {theirs}) is not a deferral of "
                f"this task instance ({identity}); another run of the partition may have replaced it. "
                f"Clear this task to start the resubmit loop again."
            )
        return state

    # -- one round ---------------------------------------------------------------------------------
    def _round(self, context: Context, paths: list[str], attempt: int, rounds: list[dict[str, Any]]) -> str:
        """Merge what is collected (attempts 1..attempt); resubmit or finalise.

        ``rounds`` lists the resubmit rounds so far (recorded in ``merged.json`` at the end).
        """
        # loads pyarrow: kept out of DAG parsing
        from anthropic_batch.results import merge_attempts

        work = storage.as_path(self.work_dir)
        manifest = read_manifest(work)
        key_columns = list(manifest.spec.key_columns)
        merged_path = layout.merged_path(work)
        retry_truncated = self.retry_truncated
        if retry_truncated is None:
            retry_truncated = bool(manifest.spec.output_model)
        # In the last round nothing is retried, so every unfinished row is a dead letter.
        # Answer reuse (issue 9): answers reused from earlier runs are one more input, merged first.
        stats = merge_attempts(
            [*merge_inputs(manifest), *paths],
            merged_path,
            key_columns,
            expected_keys=layout.keys_path(work),
            max_attempts=None if attempt >= self.max_attempts else self.max_attempts,
            retry_truncated=retry_truncated,
            retry_path=layout.retry_list_path(work),
            dead_letter_path=layout.dead_letter_path(work),
        )
        self.log.info(
            "Merged after attempt %d (best answer per request): %s", attempt, stats.counts_by_status
        )

        if stats.fatal_error_types:
            write_merge_record(merged_path, paths, attempt, rounds)
            self._save_state(context, "failed", attempt=attempt, results_paths=paths, rounds=rounds)
            raise AirflowFailException(
                f"Fatal API errors {stats.fatal_error_types}: credentials, permissions or billing must be "
                f"fixed before anything else is sent. Nothing more was submitted. Results so far: "
                f"{merged_path}; dead letters: {work / 'dead_letter.parquet'}."
            )

        if not stats.n_retry:
            write_merge_record(merged_path, paths, attempt, rounds)
            result = self._finalise(stats, merged_path, manifest, attempt)
            self._save_state(context, "finished", attempt=attempt, results_paths=paths, rounds=rounds)
            return result

        next_attempt = attempt + 1
        self.log.info(
            "Resubmitting %d request(s) as attempt %d of %d: %s",
            stats.n_retry,
            next_attempt,
            self.max_attempts,
            stats.retry_reasons,
        )
        infos = self._write_retry_chunks(manifest, paths, stats.n_retry, next_attempt)
        rounds = [
            *rounds,
            {
                "attempt": next_attempt,
                "n_requests": stats.n_retry,
                "reasons": dict(stats.retry_reasons),
                "batch_ids": [],
            },
        ]
        return self._submit_next(context, next_attempt, paths, infos, rounds)

    def _finalise(
        self, stats: MergeStats, merged_path: ObjectStoragePath, manifest: Manifest, attempt: int
    ) -> str:
        # One row per custom_id holds by construction (the merge keeps one winner per id); the
        # count must also match what was prepared.
        n_expected = manifest.n_requests
        if stats.n_rows != n_expected:
            raise AirflowException(
                f"merged results have {stats.n_rows} rows but {n_expected} requests were prepared: "
                f"refusing to publish an inconsistent result ({merged_path})"
            )
        self.log.info(
            "Final after %d attempt(s): %d rows %s; %d dead letter(s). -> %s",
            attempt,
            stats.n_rows,
            stats.counts_by_status,
            stats.n_dead_letters,
            merged_path,
        )
        return str(merged_path)

    # -- retry chunks and submission ----------------------------------------------------------------
    def _source_lines(self, manifest: Manifest, paths: Sequence[str], n_retry: int) -> Iterator[bytes]:
        """The last submitted request line of every request on the retry list, max_tokens grown
        where the last answer was truncated.

        The list (``results/retry.parquet``) is read in groups, one per source chunk file (at most
        one chunk's worth of ids in memory): attempt-1 lines come from the prepared chunk named by
        ``keys.parquet``; later ones from the retry chunk whose requests the results file of that
        attempt answered.
        """
        # pyarrow/numpy: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
        import numpy as np
        import pyarrow as pa

        from anthropic_batch.results import custom_id_of_line

        retry_path = layout.retry_list_path(self.work_dir)
        table = storage.read_parquet(
            retry_path, ["source_attempt", "chunk_index", "source_file"], use_threads=False
        )
        # A group: (attempt 1, prepared chunk index) or (attempt N, index of its results file).
        attempt_of = np.maximum(table.column("source_attempt").to_numpy(), 1)
        group_of = self._group_keys(table)
        del table
        chunks = {c.index: c.path for c in manifest.chunks}
        found = 0
        # The distinct (attempt, group) pairs, sorted, without a Python object per retry row.
        pairs = np.unique(np.stack([attempt_of.astype(np.int64), group_of]), axis=1)
        for source_attempt, group in pairs.T.tolist():
            ids: set[str] = set()
            grow: set[str] = set()
            for batch in _iter_retry_list(retry_path):
                in_group = (np.maximum(batch.column("source_attempt").to_numpy(), 1) == source_attempt) & (
                    self._group_keys(batch) == group
                )
                if in_group.any():
                    wanted = batch.filter(pa.array(in_group))
                    ids.update(wanted.column("custom_id").to_pylist())
                    grow.update(wanted.filter(wanted.column("grow")).column("custom_id").to_pylist())
            for path in self._group_chunk_files(source_attempt, group, chunks, paths):
                for line in iter_chunk_lines(path):
                    cid = custom_id_of_line(line)
                    if cid in ids:
                        ids.discard(cid)
                        found += 1
                        yield grow_max_tokens(line, self.max_tokens_growth) if cid in grow else line
                if not ids:
                    break
        lost = n_retry - found
        if lost:
            raise AirflowException(f"{lost} request line(s) to resubmit were not found in their chunk files")

    @staticmethod
    def _group_keys(table: Any) -> Any:
        """Per retry-list row: its prepared chunk index (attempt 1) or results file index (later)."""
        # pyarrow/numpy: kept out of DAG parsing
        import numpy as np

        attempt = table.column("source_attempt").to_numpy()
        chunk = table.column("chunk_index").fill_null(-1).to_numpy()
        source_file = table.column("source_file").fill_null(-1).to_numpy()
        return np.where(attempt <= 1, chunk, source_file).astype(np.int64)

    def _group_chunk_files(
        self, source_attempt: int, group: int, chunks: Mapping[int, str], paths: Sequence[str]
    ) -> list[str]:
        """The chunk file(s) holding one group's request lines, most likely first."""
        if source_attempt <= 1:
            everything = [chunks[i] for i in sorted(chunks)]
            return (
                [chunks[group], *(p for p in everything if p != chunks[group])]
                if group in chunks
                else everything
            )
        directory = retry_dir(self.work_dir, source_attempt)
        files = [
            str(p)
            for p in sorted(directory.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".jsonl") and storage.TMP_MARKER not in p.name
        ]
        if not 0 <= group < len(paths) or len(files) < 2:
            return files
        # A results file answers exactly one retry chunk and has a row for each of its requests:
        # the chunk whose first request is among the file's custom_ids is the one.
        import pyarrow as pa
        import pyarrow.compute as pc

        from anthropic_batch.results import custom_id_of_line

        answered = storage.read_parquet(paths[group], ["custom_id"], use_threads=False).column("custom_id")
        first_ids = [custom_id_of_line(next(iter(iter_chunk_lines(f)), b"")) for f in files]
        hits = pc.is_in(pa.array(first_ids, pa.string()), value_set=answered).to_pylist()
        return [f for f, hit in zip(files, hits, strict=True) if hit] + [
            f for f, hit in zip(files, hits, strict=True) if not hit
        ]

    def _write_retry_chunks(
        self, manifest: Manifest, paths: Sequence[str], n_retry: int, attempt: int
    ) -> list[dict[str, Any]]:
        """Write the retry chunk files of ``attempt``; their ChunkInfos (nothing submitted yet)."""
        directory = retry_dir(self.work_dir, attempt)
        infos = []
        groups = _chunk_groups(
            self._source_lines(manifest, paths, n_retry),
            self.max_requests_per_chunk,
            self.max_bytes_per_chunk,
        )
        for index, group in enumerate(groups):
            infos.append(write_chunk(group, directory / layout.retry_chunk_name(attempt, index), index))
        return infos

    # -- queue budget (budget branch): one retry batch at a time, each admitted before it is created --
    def _submit_next(
        self,
        context: Context,
        attempt: int,
        paths: list[str],
        infos: list[dict[str, Any]],
        rounds: list[dict[str, Any]],
    ) -> str:
        """Submit ``infos[0]`` (after queue admission) and wait for it; the rest stay pending.

        One batch at a time, so the task's one pool slot and one ticket stand for one batch: a retry
        round never has more requests in progress than one chunk.
        """
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook

        info, rest = ChunkInfo.model_validate(infos[0]), infos[1:]
        manifest = read_manifest(self.work_dir)
        identity = submission_identity(context["ti"], manifest)
        ledger = SubmissionLedger(ledger_root_for(self.work_dir, self.storage_root))
        # Same bytes at another attempt must be a new submission (see module docstring).
        fingerprint = sha256_hex(f"{info.fingerprint}:attempt-{attempt}")
        ledger_path = ledger.entry_path(
            identity["dag_id"], identity["partition"], identity["task_id"], fingerprint
        )
        entry = read_entry(ledger_path) or {}
        if identity["mode"] != "sync" and not entry.get("batch_id"):
            self._save_state(
                context, "admission", attempt=attempt, results_paths=paths, rounds=rounds, pending=infos
            )
            admit_or_defer(
                self,
                ledger_path=str(ledger_path),
                identity=identity,
                n_requests=info.n_requests,
                pipeline_budget=self.queue_budget_requests,
                method_name="admission_complete",
                conn_id=self.conn_id,
            )
        handle = BatchHandle.of(
            submit_idempotently(
                AnthropicBatchHook(conn_id=self.conn_id),
                ledger,
                chunk_path=info.path,
                chunk_fingerprint=fingerprint,
                n_requests=info.n_requests,
                n_bytes=info.n_bytes,
                **identity,
                attempt=attempt,
                model=str(manifest.spec.model),
            )
        )
        self.log.info("Attempt %d: %s (%d requests)", attempt, handle.run_id, handle.n_requests)
        # A sync run is listed by its run id (it names the results file, as a batch id does).
        rounds = [*rounds[:-1], {**rounds[-1], "batch_ids": [*rounds[-1]["batch_ids"], handle.run_id]}]
        if handle.is_sync:
            paths = [*paths, self._collect(handle, attempt)]
            if rest:
                return self._submit_next(context, attempt, paths, rest, rounds)
            return self._round(context, paths, attempt, rounds)
        self._defer_on(context, handle, attempt, paths, rest, rounds)
        raise AssertionError("unreachable: defer raises")  # pragma: no cover

    # -- end of the queue budget part --

    def _collect(self, handle: BatchHandle, attempt: int) -> str:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook

        stats = collect_batch(
            AnthropicBatchHook(conn_id=self.conn_id), handle, self.work_dir, attempt=attempt
        )
        self.log.info(
            "Collected attempt %d from %s: %s, cost $%.4f.",
            attempt,
            stats["batch_id"],
            stats["counts_by_status"],
            stats["cost_usd"],
        )
        return stats["results_path"]

    def _defer_on(
        self,
        context: Context,
        handle: BatchHandle,
        attempt: int,
        paths: list[str],
        pending: list[dict[str, Any]],
        rounds: list[dict[str, Any]],
    ) -> None:
        """Save the loop's state, then defer until ``handle``'s batch has ended."""
        self._save_state(
            context,
            "waiting",
            attempt=attempt,
            results_paths=paths,
            rounds=rounds,
            handle=handle.to_xcom(),
            pending=pending,
        )
        self.log.info("Waiting for retry batch %s (attempt %d) in the triggerer.", handle.batch_id, attempt)
        self.defer(
            trigger=BatchPollTrigger(
                batch_id=str(handle.batch_id),
                conn_id=self.conn_id,
                deadline=time.time() + self.deadline_hours * 3600,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(hours=self.deadline_hours, minutes=10),
        )
