"""ResubmitFailuresOperator: retry what can be retried, then one final row per request.

One task runs every retry round of a run:

1. merge the collected attempts (latest attempt wins) into ``work_dir/results/merged.parquet``,
   with a ``missing`` row for any prepared request no attempt returned;
2. a fatal failure (authentication / permission / billing) fails the task at once, loudly, and
   without retries (they would fail the same way); what was collected so far stays on storage;
3. retriable rows (expired, canceled, missing, invalid output, overloaded / rate-limited / server
   errors, answers cut off at ``max_tokens``) that have had fewer than ``max_attempts`` attempts go
   into retry chunks ``work_dir/requests/retry-NN/retry-NN-chunk-NNNNN.jsonl`` made of their last
   submitted request lines, byte for byte, except that ``max_tokens`` is multiplied by
   ``max_tokens_growth`` for truncated answers;
4. each retry chunk is submitted through ``ledger.submit_idempotently`` (so a retried task re-attaches
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
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context, ObjectStoragePath
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from anthropic_batch import queue_budget, storage
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
from anthropic_batch.ledger import SubmissionLedger, ledger_root_for, submit_idempotently
from anthropic_batch.operators.collect import collect_batch
from anthropic_batch.operators.submit import submission_identity
from anthropic_batch.status import DEFAULT_CONN_ID, FailureClass
from anthropic_batch.triggers import BatchPollTrigger

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow, results (pyarrow) and hooks (the anthropic SDK) are imported inside the methods that use
# them: DAG files import this module at parse time.

log = logging.getLogger(__name__)

#: Upper bound for a grown ``max_tokens`` (the largest output any current model accepts); beyond a
#: model's own limit the API answers invalid_request_error, which is dead-lettered, not retried.
MAX_TOKENS_CAP = 128_000

#: The resubmit loop's state file under ``work_dir/results/`` (see module docstring).
RESUBMIT_STATE_FILE = "resubmit-state.json"


def retry_dir(work_dir: storage.PathLike, attempt: int) -> ObjectStoragePath:
    """``work_dir/requests/retry-NN``: the chunks submitted as attempt NN (NN >= 2)."""
    return storage.as_path(work_dir) / "requests" / f"retry-{attempt:02d}"


def merge_record_path(merged_path: storage.PathLike) -> ObjectStoragePath:
    """``results/merged.json`` beside ``results/merged.parquet``: which files the merge used."""
    merged = storage.as_path(merged_path)
    return merged.parent / (merged.name.removesuffix(".parquet") + ".json")


def write_merge_record(
    merged_path: storage.PathLike,
    paths: Sequence[str],
    attempt: int,
    rounds: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Record the attempt files behind the merge, so the summary bills exactly this run's files
    (an earlier run of the same partition may have left other attempt files in the work dir), and
    the resubmit rounds (attempt, how many requests, why, which batches)."""
    storage.atomic_write_json(
        merge_record_path(merged_path),
        {
            "merged_path": str(merged_path),
            "results_paths": list(paths),
            "attempts": attempt,
            "rounds": [dict(r) for r in rounds],
        },
    )


def resubmit_state_path(work_dir: storage.PathLike) -> ObjectStoragePath:
    """``work_dir/results/resubmit-state.json``: the resubmit loop's state across deferrals."""
    return storage.as_path(work_dir) / "results" / RESUBMIT_STATE_FILE


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


def retry_reason(status: str, error_type: str | None, stop_reason: str | None) -> str:
    """A short label for the log: why this row is resubmitted."""
    if stop_reason == "max_tokens":
        return f"{status}: truncated at max_tokens"
    return f"{status}: {error_type}" if error_type else status


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


class ResubmitFailuresOperator(BaseOperator):
    """
    Merge the collected attempts, resubmit retriable failures (deferring while they run), finalise.

    :param results_paths: the attempt-1 results Parquet paths (output of the collect tasks).
    :param work_dir: the run's work directory (templated).
    :param conn_id: the Anthropic connection.
    :param max_attempts: attempts per request in all, the first one included.
    :param max_tokens_growth: ``max_tokens`` factor for answers truncated at ``max_tokens``.
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
        handle = state["handle"]
        attempt = int(state["attempt"])
        if event.get("batch_id") != handle["batch_id"]:
            raise AirflowException(
                f"The trigger reported on batch {event.get('batch_id')} but the resubmit state "
                f"({resubmit_state_path(self.work_dir)}) awaits {handle['batch_id']} (attempt {attempt}). "
                f"Clear this task to start the resubmit loop again; the ledger re-attaches to "
                f"batches already submitted."
            )
        status = event.get("status")
        if status != "ended":
            raise AirflowException(
                f"Retry batch {handle['batch_id']} (attempt {attempt}) did not end: {status}: "
                f"{event.get('message')}. A retry of this task re-attaches to the same batch."
            )
        rounds = list(state.get("rounds") or [])
        paths = [*state["results_paths"], self._collect(handle, attempt)]
        # -- queue budget (budget branch): the ended batch frees its ticket; next retry chunk --
        queue_budget.TicketQueue().release_owned(
            queue_budget.ticket_owner(submission_identity(context["ti"], read_manifest(self.work_dir))),
            str(handle.get("ledger_path")),
        )
        pending = list(state.get("pending") or [])
        if pending:
            return self._submit_next(context, attempt, paths, pending, rounds)
        return self._round(context, paths, attempt, rounds)

    def admission_complete(self, context: Context, event: Any = None, **_kwargs: Any) -> str:
        """Resume after waiting for queue admission: check again, submit the next retry chunk."""
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
        import pyarrow as pa

        from anthropic_batch.results import classify_failure, has_fatal, merge_attempts, retry_mask

        work = storage.as_path(self.work_dir)
        manifest = read_manifest(work)
        key_columns = list((manifest.get("spec") or {}).get("key_columns") or [])
        keys = storage.read_parquet(work / "requests" / "keys.parquet")
        merged_path = work / "results" / "merged.parquet"
        # Answer reuse (issue 9): answers reused from earlier runs are one more input, merged first.
        inputs = [*merge_inputs(manifest), *paths]
        merged = merge_attempts(inputs, merged_path, key_columns, expected_keys=keys)
        self.log.info("Merged after attempt %d: %s", attempt, _counts(merged, "status"))

        if has_fatal(merged):
            self._write_dead_letters(merged, key_columns)
            write_merge_record(merged_path, paths, attempt, rounds)
            self._save_state(context, "failed", attempt=attempt, results_paths=paths, rounds=rounds)
            fatal = Counter(
                row["error_type"]
                for row in merged.select(["status", "error_type", "stop_reason"]).to_pylist()
                if classify_failure(row["status"], row["error_type"], row["stop_reason"])
                is FailureClass.FATAL
            )
            raise AirflowFailException(
                f"Fatal API errors {dict(fatal)}: credentials, permissions or billing must be fixed "
                f"before anything else is sent. Nothing more was submitted. Results so far: {merged_path}; "
                f"dead letters: {work / 'dead_letter.parquet'}."
            )

        mask = retry_mask(merged, self.max_attempts)
        if attempt >= self.max_attempts or not any(mask):
            write_merge_record(merged_path, paths, attempt, rounds)
            result = self._finalise(merged, merged_path, manifest, key_columns, attempt)
            self._save_state(context, "finished", attempt=attempt, results_paths=paths, rounds=rounds)
            return result

        retry = merged.filter(pa.array(mask, pa.bool_()))
        next_attempt = attempt + 1
        reasons = Counter(
            retry_reason(r["status"], r["error_type"], r["stop_reason"])
            for r in retry.select(["status", "error_type", "stop_reason"]).to_pylist()
        )
        self.log.info(
            "Resubmitting %d request(s) as attempt %d of %d: %s",
            retry.num_rows,
            next_attempt,
            self.max_attempts,
            dict(reasons.most_common()),
        )
        infos = self._write_retry_chunks(manifest, keys, retry, next_attempt)
        rounds = [
            *rounds,
            {
                "attempt": next_attempt,
                "n_requests": retry.num_rows,
                "reasons": dict(reasons.most_common()),
                "batch_ids": [],
            },
        ]
        return self._submit_next(context, next_attempt, paths, infos, rounds)

    def _finalise(
        self,
        merged: pa.Table,
        merged_path: ObjectStoragePath,
        manifest: Mapping[str, Any],
        key_columns: list[str],
        attempt: int,
    ) -> str:
        import pyarrow.compute as pc

        ids = merged.column("custom_id")
        n_expected = int(manifest["n_requests"])
        if merged.num_rows != n_expected or pc.count_distinct(ids).as_py() != merged.num_rows:
            raise AirflowException(
                f"merged results have {merged.num_rows} rows ({pc.count_distinct(ids).as_py()} distinct) "
                f"but {n_expected} requests were prepared: refusing to publish an inconsistent result"
            )
        dead = self._write_dead_letters(merged, key_columns)
        self.log.info(
            "Final after %d attempt(s): %d rows %s; %d dead letter(s) %s. -> %s",
            attempt,
            merged.num_rows,
            _counts(merged, "status"),
            dead.num_rows,
            _counts(dead, "status"),
            merged_path,
        )
        return str(merged_path)

    def _write_dead_letters(self, merged: pa.Table, key_columns: list[str]) -> pa.Table:
        from anthropic_batch.results import dead_letter_rows

        dead = dead_letter_rows(merged, key_columns, max_attempts=None)
        storage.write_parquet_atomic(storage.as_path(self.work_dir) / "dead_letter.parquet", dead)
        return dead

    # -- retry chunks and submission ----------------------------------------------------------------
    def _source_lines(self, manifest: Mapping[str, Any], keys: pa.Table, retry: pa.Table) -> Iterator[bytes]:
        """The last submitted request line of every row in ``retry``, max_tokens grown when truncated."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from anthropic_batch.results import custom_id_of_line

        wanted: dict[int, set[str]] = {}
        truncated: set[str] = set()
        for row in retry.select(["custom_id", "attempt", "stop_reason"]).to_pylist():
            wanted.setdefault(int(row["attempt"] or 1), set()).add(row["custom_id"])
            if row["stop_reason"] == "max_tokens":
                truncated.add(row["custom_id"])
        files: list[tuple[str, set[str]]] = []
        for source_attempt in sorted(wanted):
            ids = wanted[source_attempt]
            if source_attempt == 1:
                # Only the chunks that hold a request to retry are read (vectorised lookup).
                in_retry = pc.is_in(keys.column("custom_id"), pa.array(sorted(ids), pa.string()))
                indices = sorted(set(keys.filter(in_retry).column("chunk_index").to_pylist()))
                chunks = {int(c["index"]): str(c["path"]) for c in manifest["chunks"]}
                files += [(chunks[i], ids) for i in indices]
            else:
                directory = retry_dir(self.work_dir, source_attempt)
                files += [
                    (str(p), ids)
                    for p in sorted(directory.iterdir(), key=lambda p: p.name)
                    if p.name.endswith(".jsonl") and storage.TMP_MARKER not in p.name
                ]
        found: set[str] = set()
        for path, ids in files:
            for line in iter_chunk_lines(path):
                cid = custom_id_of_line(line)
                if cid in ids and cid not in found:
                    found.add(cid)
                    yield grow_max_tokens(line, self.max_tokens_growth) if cid in truncated else line
        lost = retry.num_rows - len(found)
        if lost:
            raise AirflowException(f"{lost} request line(s) to resubmit were not found in their chunk files")

    def _write_retry_chunks(
        self, manifest: Mapping[str, Any], keys: pa.Table, retry: pa.Table, attempt: int
    ) -> list[dict[str, Any]]:
        """Write the retry chunk files of ``attempt``; their ChunkInfos (nothing submitted yet)."""
        directory = retry_dir(self.work_dir, attempt)
        infos = []
        groups = _chunk_groups(
            self._source_lines(manifest, keys, retry), self.max_requests_per_chunk, self.max_bytes_per_chunk
        )
        for index, group in enumerate(groups):
            infos.append(
                write_chunk(group, directory / f"retry-{attempt:02d}-chunk-{index:05d}.jsonl", index)
            )
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
        from anthropic_batch.hooks import BatchHook

        info, rest = infos[0], infos[1:]
        manifest = read_manifest(self.work_dir)
        identity = submission_identity(context["ti"], manifest)
        ledger = SubmissionLedger(ledger_root_for(self.work_dir, self.storage_root))
        # Same bytes at another attempt must be a new submission (see module docstring).
        fingerprint = sha256_hex(f"{info['fingerprint']}:attempt-{attempt}")
        ledger_path = ledger.entry_path(
            identity["dag_id"], identity["partition"], identity["task_id"], fingerprint
        )
        entry = storage.read_json(ledger_path) or {}
        if identity["mode"] != "sync" and not entry.get("batch_id"):
            self._save_state(
                context, "admission", attempt=attempt, results_paths=paths, rounds=rounds, pending=infos
            )
            queue_budget.admit_or_defer(
                self,
                ledger_path=str(ledger_path),
                identity=identity,
                n_requests=int(info["n_requests"]),
                pipeline_budget=self.queue_budget_requests,
                admission_poll_seconds=self.poll_interval,
                method_name="admission_complete",
                conn_id=self.conn_id,
            )
        handle = submit_idempotently(
            BatchHook(conn_id=self.conn_id),
            ledger,
            chunk_path=info["path"],
            chunk_fingerprint=fingerprint,
            n_requests=int(info["n_requests"]),
            n_bytes=int(info["n_bytes"]),
            **identity,
            attempt=attempt,
            model=str((manifest.get("spec") or {}).get("model")),
        )
        self.log.info("Attempt %d: %s (%d requests)", attempt, handle["batch_id"], handle["n_requests"])
        rounds = [*rounds[:-1], {**rounds[-1], "batch_ids": [*rounds[-1]["batch_ids"], handle["batch_id"]]}]
        if handle["mode"] == "sync":
            paths = [*paths, self._collect(handle, attempt)]
            if rest:
                return self._submit_next(context, attempt, paths, rest, rounds)
            return self._round(context, paths, attempt, rounds)
        self._defer_on(context, handle, attempt, paths, rest, rounds)
        raise AssertionError("unreachable: defer raises")  # pragma: no cover

    # -- end of the queue budget part --

    def _collect(self, handle: Mapping[str, Any], attempt: int) -> str:
        from anthropic_batch.hooks import BatchHook

        stats = collect_batch(BatchHook(conn_id=self.conn_id), handle, self.work_dir, attempt=attempt)
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
        handle: dict[str, Any],
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
            handle=handle,
            pending=pending,
        )
        self.log.info(
            "Waiting for retry batch %s (attempt %d) in the triggerer.", handle["batch_id"], attempt
        )
        self.defer(
            trigger=BatchPollTrigger(
                batch_id=handle["batch_id"],
                conn_id=self.conn_id,
                deadline=time.time() + self.deadline_hours * 3600,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(hours=self.deadline_hours, minutes=10),
        )


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    import pyarrow.compute as pc

    return {str(e["values"]): int(e["counts"]) for e in pc.value_counts(table[column]).to_pylist()}
