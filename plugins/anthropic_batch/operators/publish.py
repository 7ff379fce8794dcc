"""PublishPartitionOperator: the run's final partition, switched in for readers in one step.

The partition ``{pipeline}/extractions/date=YYYY-MM-DD/`` holds (see ``anthropic_batch.partition``
for the protocol and the reader function every reader uses):

- ``_COMMIT.json``: names the current generation and its complete file set with sizes;
- ``_gen=<id>/data.parquet``: the merged rows, exactly one per prepared request (RESULT schema);
- ``_gen=<id>/dead_letter.parquet``: records refused at prepare time plus requests that failed
  permanently or exhausted their attempts (DEAD_LETTER schema, ``stage`` says which);
- ``_gen=<id>/summary.json``: the run summary (counts, tokens, cost, savings, batch ids, price table date);
- ``_SUCCESS``: written after the commit, for outside tools that wait for one.

A re-run or backfill of the date writes a new generation, commits it (one write), then deletes
the older generations: a reader resolving through the commit sees the old partition or the new
one, never a mix, on a local disk and on object stores alike. A failure before the commit leaves
the published partition untouched.

Memory is bounded whatever the size of the day: ``data.parquet`` is a byte copy of the merged file,
the dead letters are streamed batch by batch, and the summary's numbers are aggregated from a few
columns read row group by row group (``stream_counts``, ``billed_spend``).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context, ObjectStoragePath

from anthropic_batch import layout, partition, storage
from anthropic_batch.answer_reuse import cache_after_publish, summary_fields
from anthropic_batch.contracts import Manifest, RunSummary
from anthropic_batch.partition import (  # noqa: F401  (re-exported: the partition's file names)
    COMMIT_FILE,
    DATA_FILE,
    DEAD_LETTER_FILE,
    SUCCESS_MARKER,
    SUMMARY_FILE,
)
from anthropic_batch.pricing import CostBreakdown, load_price_table
from anthropic_batch.sync_backend import takeover_summary

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow and results (pyarrow) are imported inside the functions that use them: DAG files import
# this module at parse time.

log = logging.getLogger(__name__)

_TOKEN_COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}
_BATCH_ROWS = 20_000
_COPY_BLOCK = 8 * 1024 * 1024


@dataclass
class RowCounts:
    """Rows of a table and value counts of one column (streamed, small)."""

    n_rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    max_attempt: int = 0


@dataclass
class Spend:
    """What the run's attempts cost (every collected file, every attempt)."""

    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_COLUMNS, 0))
    cost_usd: float = 0.0
    sync_cost_usd: float = 0.0
    batch_ids: set[str] = field(default_factory=set)
    # (model, paid at the batch price) -> token column -> sum: what the cost breakdown is priced from.
    usage: dict[tuple[str, bool], dict[str, int]] = field(default_factory=dict)

    def breakdown(self, cache_ttl: str = "5m") -> CostBreakdown:
        """The :class:`~anthropic_batch.pricing.CostBreakdown` of these tokens at today's price table."""
        prices = load_price_table()
        total = CostBreakdown()
        for (model, batch), usage in sorted(self.usage.items()):
            total += prices.breakdown(model, usage, batch=batch, cache_ttl=cache_ttl)
        return total


def _batches(path: storage.PathLike, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    """A Parquet file's record batches, one row group at a time (only the ``columns`` it has)."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.parquet as pq

    with storage.open_binary(path) as handle:
        parquet = pq.ParquetFile(handle)
        wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
        if parquet.metadata.num_rows:
            yield from parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted, use_threads=False)


def stream_counts(path: storage.PathLike, column: str) -> RowCounts:
    """Row count, value counts of ``column`` and the largest ``attempt`` of a Parquet file, streamed."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.compute as pc

    result = RowCounts()
    counts: Counter[str] = Counter()
    for batch in _batches(path, [column, "attempt"]):
        result.n_rows += batch.num_rows
        if column in batch.schema.names:
            for entry in pc.value_counts(batch.column(column)).to_pylist():
                counts[str(entry["values"])] += int(entry["counts"])
        if "attempt" in batch.schema.names:
            result.max_attempt = max(result.max_attempt, int(pc.max(batch.column("attempt")).as_py() or 0))
    result.counts = dict(sorted(counts.items()))
    return result


def billed_paths(work_dir: ObjectStoragePath, merged_path: storage.PathLike | None = None) -> list[str]:
    """Every collected results file of the run (all attempts): what was actually billed.

    The files are those the resubmit step merged (its ``merged.json`` record) when it exists;
    otherwise every ``results/attempt-NN/*.parquet`` of the work dir.
    """
    record = storage.read_json(layout.merge_record_path(merged_path)) if merged_path else None
    if record and record.get("results_paths") is not None:
        return [str(p) for p in record["results_paths"]]
    return [str(file) for file in layout.attempt_result_files(work_dir)]


def billed_spend(paths: Sequence[storage.PathLike]) -> Spend:
    """Tokens, cost and batch ids summed over ``paths``, a few columns at a time."""
    # pyarrow/numpy: kept out of DAG parsing
    import pyarrow.compute as pc

    spend = Spend()
    columns = ["cost_usd", "sync_cost_usd", "batch_id", "model", *_TOKEN_COLUMNS.values()]
    for path in paths:
        for batch in _batches(path, columns):
            names = batch.schema.names
            _add_usage(spend, batch)
            spend.cost_usd += (
                float(pc.sum(batch.column("cost_usd")).as_py() or 0) if "cost_usd" in names else 0
            )
            if "sync_cost_usd" in names:
                spend.sync_cost_usd += float(pc.sum(batch.column("sync_cost_usd")).as_py() or 0)
            for name, column in _TOKEN_COLUMNS.items():
                if column in names:
                    spend.tokens[name] += int(pc.sum(batch.column(column)).as_py() or 0)
            if "batch_id" in names:
                spend.batch_ids.update(b for b in pc.unique(batch.column("batch_id")).to_pylist() if b)
    return spend


def _add_usage(spend: Spend, batch: pa.RecordBatch) -> None:
    """Token sums per (model, batch-priced) of one record batch into ``spend.usage``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    if "model" not in names:
        return
    table = pa.Table.from_batches([batch])
    # A row paid less than its synchronous equivalent was paid at the batch price (mode=sync rows
    # and the takeover's synchronous answers are priced synchronously).
    if "cost_usd" in names and "sync_cost_usd" in names:
        batch_priced = pc.fill_null(pc.less(table["cost_usd"], table["sync_cost_usd"]), False)
    else:
        batch_priced = pa.array([True] * table.num_rows)
    table = table.append_column("_batch", batch_priced)
    columns = [c for c in _TOKEN_COLUMNS.values() if c in names]
    grouped = table.group_by(["model", "_batch"]).aggregate([(c, "sum") for c in columns])
    for row in grouped.to_pylist():
        if row["model"] is None:
            continue
        usage = spend.usage.setdefault((str(row["model"]), bool(row["_batch"])), dict.fromkeys(columns, 0))
        for c in columns:
            usage[c] = usage.get(c, 0) + int(row[f"{c}_sum"] or 0)


def write_dead_letters(
    out_path: storage.PathLike, sources: Sequence[storage.PathLike], key_columns: Sequence[str]
) -> RowCounts:
    """Prepare rejections and collection dead letters into one DEAD_LETTER file, streamed.

    Sources that do not exist are skipped; returns the row count and the count per ``stage``.
    """
    # pyarrow/numpy: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
    import pyarrow.compute as pc

    from anthropic_batch.table_schemas import dead_letter_schema

    schema = dead_letter_schema(key_columns)
    result = RowCounts()
    stages: Counter[str] = Counter()

    def batches() -> Iterator[pa.RecordBatch]:
        for source in sources:
            if not storage.as_path(source).exists():
                continue
            for batch in _batches(source):
                batch = batch.select(schema.names).cast(schema)
                result.n_rows += batch.num_rows
                for entry in pc.value_counts(batch.column("stage")).to_pylist():
                    stages[str(entry["values"])] += int(entry["counts"])
                yield batch

    storage.write_parquet_atomic(out_path, batches(), schema)
    result.counts = dict(sorted(stages.items()))
    return result


def copy_file(source: storage.PathLike, target: storage.PathLike) -> None:
    """Copy bytes in blocks (the merged file already is the partition's data file)."""
    with storage.open_binary(source) as reader, storage.open_atomic_writer(target) as writer:
        shutil.copyfileobj(reader, writer, _COPY_BLOCK)


def build_summary(
    *,
    manifest: Manifest,
    merged: RowCounts,
    dead_letters: RowCounts,
    billed: Spend,
    dag_id: str | None,
    run_id: str | None,
    data_path: str,
    dead_letter_path: str,
    price_table_as_of: str,
    sample_cost_usd: float | None = None,
    pipeline: str | None = None,
    sync_takeover: Mapping[str, Any] | None = None,
) -> RunSummary:
    """The run summary (ARCHITECTURE.md, summary.json). Cost and tokens count every attempt;
    ``cost_usd`` and ``sync_cost_usd`` include the sample gate's ``sample_cost_usd``.

    ``merged``: rows and counts by status of the merged results; ``dead_letters``: rows and counts
    by stage; ``billed``: the spend of every collected file (``billed_spend``). ``pipeline``
    overrides the manifest's; ``sync_takeover`` is ``sync_backend.takeover_summary``.
    """
    spec = manifest.spec
    summary: dict[str, Any] = {
        "pipeline": pipeline or spec.pipeline,
        "dag_id": dag_id,
        "run_id": run_id,
        "partition": spec.partition,
        "mode": manifest.mode,
        "model": spec.model,
        "n_input_records": manifest.n_input_records,
        "n_requests": manifest.n_requests,
        "n_rows": merged.n_rows,
        "counts_by_status": dict(merged.counts),
        "n_dead_letters": dead_letters.n_rows,
        "n_dead_letters_by_stage": dict(dead_letters.counts),
        "tokens": dict(billed.tokens),
        "cost_usd": round(billed.cost_usd, 6),
        "sync_cost_usd": round(billed.sync_cost_usd, 6),
        "savings_usd": round(billed.sync_cost_usd - billed.cost_usd, 6),
        # Issue 13: input, output, cache writes, cache reads, cache and batch savings, tokens and
        # dollars, over every attempt's results (the sample is in sample_cost_usd).
        "cost_breakdown": billed.breakdown(str(spec.cache_ttl or "5m")),
        "batch_ids": sorted(billed.batch_ids),
        "attempts": merged.max_attempt,
        "price_table_as_of": price_table_as_of,
        "data_path": data_path,
        "dead_letter_path": dead_letter_path,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if sample_cost_usd is not None:
        # The sample's answers were paid at the synchronous price: they add to the cost and to its
        # synchronous equivalent alike (savings unchanged).
        summary["sample_cost_usd"] = round(sample_cost_usd, 6)
        summary["cost_usd"] = round(billed.cost_usd + sample_cost_usd, 6)
        summary["sync_cost_usd"] = round(billed.sync_cost_usd + sample_cost_usd, 6)
    summary.update(summary_fields(manifest))  # answer reuse (issue 9): n_reused, reused_cost_usd
    return RunSummary(**summary, sync_takeover=sync_takeover)


def publish_partition(
    target: storage.PathLike,
    *,
    merged_path: storage.PathLike,
    dead_letter_sources: Sequence[storage.PathLike],
    key_columns: Sequence[str],
    make_summary: Callable[[RowCounts, RowCounts, str, str], RunSummary],
    **commit_details: Any,
) -> tuple[partition.PublishedPartition, RunSummary]:
    """Write a new generation of the partition at ``target``, commit it, then clean up.

    ``make_summary(merged, dead_letters, data_path, dead_letter_path)`` builds the summary from the
    streamed counts. Nothing readers see changes unless every file was written.
    """
    generation = partition.new_generation()
    root = partition.generation_dir(target, generation)
    try:
        copy_file(merged_path, root / DATA_FILE)
        merged = stream_counts(root / DATA_FILE, "status")
        dead = write_dead_letters(root / DEAD_LETTER_FILE, dead_letter_sources, key_columns)
        summary = make_summary(merged, dead, str(root / DATA_FILE), str(root / DEAD_LETTER_FILE))
        storage.atomic_write_json(root / SUMMARY_FILE, summary.model_dump(mode="json"))
    except BaseException:
        partition.remove_generation(target, generation)  # uncommitted: no reader can see it
        raise
    published = partition.commit_partition(target, generation, **commit_details)
    removed = partition.remove_superseded(target, generation)
    if removed:
        log.info("Removed superseded entries of %s: %s", target, removed)
    return published, summary


class PublishPartitionOperator(BaseOperator):
    """
    Publish a run's merged results, dead letters and summary as one partition.

    :param work_dir: the run's work directory (manifest, rejections, dead letters, attempts).
    :param merged_path: the merged results Parquet (output of ResubmitFailuresOperator).
    :param extraction_dir: the partition directory to publish to (templated).
    :param pipeline: overrides the pipeline name from the manifest in the summary (optional).
    :returns: the summary dict (small: counts and totals, no rows).
    """

    template_fields: Sequence[str] = ("work_dir", "merged_path", "extraction_dir")
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        work_dir: str,
        merged_path: str,
        extraction_dir: str,
        pipeline: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.work_dir = work_dir
        self.merged_path = merged_path
        self.extraction_dir = extraction_dir
        self.pipeline = pipeline

    def execute(self, context: Context) -> dict[str, Any]:
        work_dir = storage.as_path(self.work_dir)
        target = storage.as_path(self.extraction_dir)
        manifest = layout.read_manifest(work_dir)
        key_columns = manifest.spec.key_columns
        sample_report = storage.read_json(layout.sample_report_path(work_dir))
        ti = context["ti"]
        billed = billed_spend(billed_paths(work_dir, self.merged_path))

        def make_summary(merged: RowCounts, dead: RowCounts, data_path: str, dead_path: str) -> RunSummary:
            return build_summary(
                manifest=manifest,
                merged=merged,
                dead_letters=dead,
                billed=billed,
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                data_path=data_path,
                dead_letter_path=dead_path,
                price_table_as_of=load_price_table().as_of,
                sample_cost_usd=(sample_report or {}).get("sample_cost_usd"),
                pipeline=self.pipeline,
                sync_takeover=takeover_summary(work_dir),  # mode=sync taking over batches in flight
            )

        published, summary = publish_partition(
            target,
            merged_path=self.merged_path,
            dead_letter_sources=[layout.rejected_path(work_dir), layout.dead_letter_path(work_dir)],
            key_columns=key_columns,
            make_summary=make_summary,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            partition=manifest.spec.partition,
        )
        try:  # answer reuse (issue 9): the answers this run paid for, for other dates to reuse
            cache_after_publish(manifest, self.merged_path, ti.run_id)
        except Exception:  # the partition is published; a cache miss later only costs a resend
            log.exception("Could not add this run's answers to the answer cache.")
        log.info(
            "Published %s (generation %s): %d rows %s, %d dead letters; cost $%.4f (sync would be $%.4f, "
            "saved $%.4f); %d answer(s) reused ($%.4f not paid again).",
            target,
            published.generation,
            summary.n_rows,
            summary.counts_by_status,
            summary.n_dead_letters,
            summary.cost_usd,
            summary.sync_cost_usd,
            summary.savings_usd,
            summary.n_reused,
            summary.reused_cost_usd,
        )
        return summary.model_dump(mode="json")  # XCom carries the RunSummary's JSON
