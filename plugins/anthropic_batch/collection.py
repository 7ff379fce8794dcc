"""Collect one submitted chunk: an ended batch's results (or a sync run's) -> a RESULT Parquet file.

``collect_batch`` is shared by the collect and resubmit operators. It streams the raw result
lines (the batch's ``results_url`` through ``AnthropicBatchHook.iter_result_lines``, or in ``mode=sync`` the
results JSONL the sync runner wrote) into ``results.collect_lines``, which writes
``work_dir/results/attempt-NN/<batch_id>.parquet`` atomically with exactly one row per request of the
chunk: a request without a result line becomes a ``missing`` row, a duplicate line (a resumed
download) counts once. Re-running overwrites the same file, so a retried collect is idempotent. A
canceled or expired batch is collected like any other: its succeeded rows are kept, the rest get
their status (and are resubmitted later).

The ledger entry of the submission is updated with the collected path, cost and state ``ended``.
In ``mode=sync`` the entry's ``results_path`` keeps pointing at the JSONL (a re-attached handle
needs it); the Parquet path goes to ``collected_path`` in both modes.

Also the merge record (``results/merged.json``): which collected files the resubmit step merged,
read by publish to bill exactly those.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import ObjectStoragePath

from anthropic_batch import storage
from anthropic_batch.cancel import takeover_cancel_reason, user_cancel_reason
from anthropic_batch.contracts import BatchHandle, Manifest
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.layout import attempt_dir, merge_record_path, results_file  # noqa: F401  (re-exported)
from anthropic_batch.ledger import (
    batch_fields,
    read_entry,
    reset_foreign_batch,
    rfc3339,
    update_entry,
    utc_now,
)
from anthropic_batch.pricing import PriceTable, load_price_table
from anthropic_batch.status import (
    ENDED_COUNT_KEYS,
    LedgerState,
    ProcessingStatus,
    RequestCountKey,
    RequestStatus,
)
from anthropic_batch.submission import ForeignBatchError, iter_verified_lines

if TYPE_CHECKING:
    from anthropic_batch.hooks import AnthropicBatchHook

# batch_requests, results (pyarrow) and hooks (the anthropic SDK) are imported inside the functions
# that use them: DAG files import this module at parse time.

log = logging.getLogger(__name__)

#: Which RESULT statuses come from which ``request_counts`` bucket of the batch.
_COUNT_BUCKET: dict[str, str] = {
    RequestStatus.SUCCEEDED: RequestCountKey.SUCCEEDED.value,
    RequestStatus.INVALID_OUTPUT: RequestCountKey.SUCCEEDED.value,
    RequestStatus.NEEDS_FOLLOWUP: RequestCountKey.SUCCEEDED.value,
    RequestStatus.ERRORED: RequestCountKey.ERRORED.value,
    RequestStatus.CANCELED: RequestCountKey.CANCELED.value,
    RequestStatus.EXPIRED: RequestCountKey.EXPIRED.value,
}


class BatchNotEndedError(AnthropicBatchError, RuntimeError):
    """Results were asked for before the batch ended."""


class ResultsArchivedError(AnthropicBatchError, RuntimeError):
    """The API archived a batch's results and no collected file of it is in storage."""


def _archived_message(
    batch_id: str, archived_at: str, out: ObjectStoragePath, ledger_path: str | None, chunk_path: str
) -> str:
    return (
        f"Cannot collect batch {batch_id}: the API archived its results at {archived_at} (they can be "
        f"downloaded for 29 days after the batch was created), and the collected file {out} is not in "
        f"storage. Restore {out} from a backup and clear this task; or, to pay for the chunk "
        f"{chunk_path} again, delete its ledger entry {ledger_path or '(none recorded)'} and clear the "
        "submit task."
    )


def _foreign_message(err: ForeignBatchError, batch_id: str, ledger_path: str | None) -> str:
    """Why the batch was refused, after resetting its ledger entry so the chunk is submitted anew."""
    reset = ""
    if ledger_path:
        try:
            reset_foreign_batch(ledger_path, batch_id)
            reset = (
                f" The ledger entry {ledger_path} no longer names it (kept in foreign_batch_ids): clear "
                "this chunk's submit task to submit the chunk anew."
            )
        except FileNotFoundError:
            reset = f" Its ledger entry {ledger_path} is gone: clear the submit task to submit anew."
    return (
        f"{err} Nothing of it was collected or published.{reset} Look the batch up in the Anthropic "
        "Console: it belongs to some other submission."
    )


def stored_stats(path: ObjectStoragePath) -> dict[str, Any]:
    """Collection stats of a RESULT file already in storage (what ``collect_lines`` reported)."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.compute as pc

    table = storage.read_parquet(
        path,
        columns=[
            "status",
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cost_usd",
            "sync_cost_usd",
        ],
        use_threads=False,
    )

    def total(column: str) -> float:
        return pc.sum(table[column]).as_py() or 0

    counts = {row["values"]: row["counts"] for row in pc.value_counts(table["status"]).to_pylist()}
    return {
        "out_path": str(path),
        "results_path": str(path),
        "n_lines": 0,
        "n_rows": table.num_rows,
        "n_duplicates": 0,
        "n_unknown": 0,
        "n_malformed": 0,
        "n_missing": int(counts.get(RequestStatus.MISSING, 0)),
        "counts_by_status": counts,
        "tokens": {
            "input": int(total("input_tokens")),
            "output": int(total("output_tokens")),
            "cache_creation": int(total("cache_creation_input_tokens")),
            "cache_read": int(total("cache_read_input_tokens")),
        },
        "cost_usd": float(total("cost_usd")),
        "sync_cost_usd": float(total("sync_cost_usd")),
        "unknown_custom_ids": [],
        "malformed_samples": [],
        "request_counts": None,
        "reused": True,
    }


# attempt_dir / results_file (``work_dir/results/attempt-NN/<batch_id>.parquet``): see layout.py.


def price_table_for_mode(mode: str, prices: PriceTable | None = None) -> PriceTable:
    """The price table to cost rows with: synchronous runs pay list price (no batch discount)."""
    prices = prices or load_price_table()
    return prices.overlay({"batch_discount": 1}) if mode == "sync" else prices


def chunk_index_of(manifest: Manifest, chunk_path: str) -> int | None:
    """The index of an original chunk in the manifest; None for retry chunks (not listed there)."""
    wanted = str(storage.as_path(chunk_path))
    for chunk in manifest.chunks:
        if str(storage.as_path(chunk.path)) == wanted:
            return chunk.index
    return None


def request_counts_by_bucket(counts_by_status: Mapping[str, int]) -> dict[str, int]:
    """Collected row counts folded into the API's ``request_counts`` buckets (missing rows apart)."""
    missing, errored = RequestStatus.MISSING.value, RequestCountKey.ERRORED.value
    buckets = dict.fromkeys((*ENDED_COUNT_KEYS, missing), 0)
    for status, n in counts_by_status.items():
        buckets[_COUNT_BUCKET.get(status, missing if status == missing else errored)] += n
    return buckets


def collect_batch(
    hook: AnthropicBatchHook,
    handle: BatchHandle | Mapping[str, Any],
    work_dir: storage.PathLike,
    *,
    attempt: int | None = None,
    prices: PriceTable | None = None,
) -> dict[str, Any]:
    """
    Collect one submitted chunk's results into ``work_dir/results/attempt-NN/<batch_id>.parquet``.

    :param hook: the Anthropic hook (only used in batch mode).
    :param handle: the BatchHandle returned by submit (or its XCom JSON, validated here).
    :param work_dir: the run's work directory (manifest and keys are read from it).
    :param attempt: attempt number for the output directory; default: the handle's.
    :returns: collection stats (``CollectStats`` as a dict) plus ``results_path``, ``batch_id``,
        ``attempt``, ``mode`` and ``request_counts`` (the API's, batch mode only).
    """
    # the anthropic SDK: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
    import anthropic

    from anthropic_batch.batch_requests import iter_chunk_lines, read_manifest
    from anthropic_batch.results import ParseContext, collect_lines, expected_ids_from_chunk

    work = storage.as_path(work_dir)
    manifest = read_manifest(work)
    handle = BatchHandle.of(dict(handle) if isinstance(handle, Mapping) else handle)
    # The batch id, or the sync run's id: it names the results file and fills the rows' batch_id.
    batch_id = handle.run_id
    mode = handle.mode.value
    attempt = int(attempt if attempt is not None else handle.attempt)
    if not handle.chunk_path:
        raise ValueError(f"Cannot collect {batch_id}: its handle names no chunk_path.")
    chunk_path = handle.chunk_path
    ledger_path = handle.ledger_path
    out = results_file(work, attempt, batch_id)

    # Stored results are the source of truth: a batch collected once (the file appears atomically,
    # only after every line was verified to be this chunk's) is never downloaded again, so a rerun
    # after the API archived the batch (29 days) still works and costs nothing.
    if out.exists():
        result = {**stored_stats(out), "batch_id": batch_id, "attempt": attempt, "mode": mode}
        log.info("Batch %s was collected before (%s); using the stored file, not the API.", batch_id, out)
        if ledger_path:
            _record_in_ledger(ledger_path, None, result)
        return result

    batch: dict[str, Any] | None = None
    if handle.is_sync:
        if not handle.results_path:
            raise ValueError(f"sync handle for {chunk_path} has no results_path")
        lines: Iterable[bytes] = iter_chunk_lines(handle.results_path)
    else:
        batch = hook.get_batch(batch_id).model_dump(mode="json")
        if batch["processing_status"] != ProcessingStatus.ENDED:
            raise BatchNotEndedError(
                f"Batch {batch_id} is {batch['processing_status']}, not ended: wait for it first."
            )
        if batch.get("archived_at"):
            raise ResultsArchivedError(
                _archived_message(batch_id, batch["archived_at"], out, ledger_path, chunk_path)
            )
        lines = hook.iter_result_lines(batch_id)

    index = chunk_index_of(manifest, chunk_path)
    # A batch a user canceled (Batches page): its canceled rows say so and are never resubmitted.
    entry = read_entry(ledger_path) if ledger_path else None
    expected = expected_ids_from_chunk(chunk_path)
    ctx = ParseContext.from_work_dir(
        work,
        batch_id=batch_id,
        attempt=attempt,
        chunk_indices=None if index is None else [index],
        # A retry chunk is in no manifest chunk: load the keys of its own requests, not the day's.
        custom_ids=expected if index is None else None,
        prices=price_table_for_mode(mode, prices),
        manifest=manifest,
        user_cancel_reason=user_cancel_reason(entry) or takeover_cancel_reason(entry, batch_id),
    )
    # Every line must answer a request of this chunk before anything is written: a batch that is
    # not ours (e.g. an orphan recovered while it still ran) is never collected, hence never published.
    verified = iter_verified_lines(lines, expected, batch_id=batch_id, chunk_path=chunk_path)
    try:
        stats = collect_lines(verified, out, ctx, expected_custom_ids=expected)
    except ForeignBatchError as err:
        raise ForeignBatchError(_foreign_message(err, batch_id, ledger_path)) from err
    except anthropic.NotFoundError as err:
        if handle.is_sync:
            raise
        raise ResultsArchivedError(
            _archived_message(batch_id, "(results answer 404)", out, ledger_path, chunk_path)
        ) from err
    # mode=sync (sync_backend): answers reused from a taken-over batch were billed at batch price.
    if handle.is_sync:
        from anthropic_batch.sync_backend import reprice_batch_answers

        repriced = reprice_batch_answers(out, str(handle.results_path), prices or load_price_table())
        if repriced is not None:
            stats.cost_usd = repriced
    result = {
        **stats.to_dict(),
        "results_path": str(out),
        "batch_id": batch_id,
        "attempt": attempt,
        "mode": mode,
        "request_counts": (batch or {}).get("request_counts"),
    }
    if batch is not None:
        _check_counts(batch_id, batch.get("request_counts") or {}, stats.counts_by_status)
    if stats.n_unknown or stats.n_malformed:
        log.warning(
            "Batch %s: %d result lines with unknown custom_ids (e.g. %s), %d malformed (e.g. %s).",
            batch_id,
            stats.n_unknown,
            stats.unknown_custom_ids[:3],
            stats.n_malformed,
            stats.malformed_samples[:1],
        )
    if ledger_path:
        _record_in_ledger(ledger_path, batch, result)
    return result


def _check_counts(batch_id: str, api_counts: Mapping[str, Any], counts_by_status: Mapping[str, int]) -> None:
    """Warn when the rows disagree with the batch's own request_counts (lines lost or unreadable)."""
    ours = request_counts_by_bucket(counts_by_status)
    differs = {
        bucket: (int(api_counts.get(bucket) or 0), ours[bucket])
        for bucket in ENDED_COUNT_KEYS
        if int(api_counts.get(bucket) or 0) != ours[bucket]
    }
    if differs or ours[RequestStatus.MISSING]:
        log.warning(
            "Batch %s: collected rows differ from request_counts (api, rows): %s; %d missing.",
            batch_id,
            differs,
            ours[RequestStatus.MISSING],
        )


def _record_in_ledger(ledger_path: str, batch: dict[str, Any] | None, result: Mapping[str, Any]) -> None:
    # -- mode=sync (sync_backend) may have taken this chunk's batch over: the entry is no longer its.
    current = read_entry(ledger_path) or {}
    if batch is not None and current.get("mode") == "sync":
        log.warning(
            "Ledger entry %s now records a synchronous run of this chunk (batch %s was taken over); "
            "not recording this collect there.",
            ledger_path,
            result["batch_id"],
        )
        return
    # -- end mode=sync
    fields: dict[str, Any] = {
        "state": LedgerState.ENDED.value,
        "collected_path": result["results_path"],
        "collected_at": rfc3339(utc_now()),
        "cost_usd": round(float(result["cost_usd"]), 6),
        "sync_cost_usd": round(float(result["sync_cost_usd"]), 6),
        "counts_by_status": result["counts_by_status"],
    }
    if batch is not None:
        fields.update(batch_fields(batch))
        fields["results_path"] = result["results_path"]
    try:
        update_entry(ledger_path, **fields)
    except FileNotFoundError:
        log.warning("Ledger entry %s not found; results collected but not recorded there.", ledger_path)


# -- the merge record ------------------------------------------------------------------------------
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
