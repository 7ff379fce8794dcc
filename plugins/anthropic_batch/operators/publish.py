"""PublishPartitionOperator: the run's final partition, written atomically where consumers read it.

The partition ``{pipeline}/extractions/date=YYYY-MM-DD/`` holds:

- ``data.parquet``: the merged rows, exactly one per prepared request (RESULT schema);
- ``dead_letter.parquet``: records refused at prepare time plus requests that failed permanently or
  exhausted their attempts (DEAD_LETTER schema, ``stage`` says which);
- ``summary.json``: the run summary (counts, tokens, cost, savings, batch ids, price table date);
- ``_SUCCESS``: written last; a reader that sees it sees a complete partition.

Replacing a partition (a re-run or backfill of the same date) never shows readers a mix:

- local file system: everything is written into a hidden sibling directory, then swapped in with
  two ``os.replace`` calls (old -> trash name, new -> final name) and the old copy removed. The only
  window is between the two renames, when the partition is briefly absent (never half-written);
- object stores (no directory rename): ``_SUCCESS`` is deleted first, then each file is put
  atomically (storage helpers) and ``_SUCCESS`` is written last. Readers must wait for ``_SUCCESS``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context, ObjectStoragePath

from anthropic_batch import storage
from anthropic_batch.pricing import load_price_table

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow and results (pyarrow) are imported inside the functions that use them: DAG files import
# this module at parse time.

log = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
DEAD_LETTER_FILE = "dead_letter.parquet"
SUMMARY_FILE = "summary.json"
SUCCESS_MARKER = "_SUCCESS"

_TOKEN_COLUMNS = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}


def _sum(table: pa.Table, column: str) -> float:
    if column not in table.column_names or table.num_rows == 0:
        return 0
    import pyarrow.compute as pc

    value = pc.sum(table[column]).as_py()
    return value or 0


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    if column not in table.column_names or table.num_rows == 0:
        return {}
    import pyarrow.compute as pc

    pairs = ((str(e["values"]), int(e["counts"])) for e in pc.value_counts(table[column]).to_pylist())
    return dict(sorted(pairs))


def _read_optional(path: ObjectStoragePath) -> pa.Table | None:
    return storage.read_parquet(path) if path.exists() else None


def attempt_tables(
    work_dir: ObjectStoragePath, merged_path: storage.PathLike | None = None
) -> list[pa.Table]:
    """Every collected results file of the run (all attempts): what was actually billed.

    The files are those the resubmit step merged (its ``merged.json`` record) when it exists;
    otherwise every ``results/attempt-NN/*.parquet`` of the work dir.
    """
    from anthropic_batch.operators.resubmit import merge_record_path

    record = storage.read_json(merge_record_path(merged_path)) if merged_path else None
    if record and record.get("results_paths") is not None:
        return [storage.read_parquet(p) for p in record["results_paths"]]
    results = work_dir / "results"
    if not results.exists():
        return []
    tables = []
    for attempt_dir in sorted(results.iterdir(), key=lambda p: p.name):
        if not attempt_dir.name.startswith("attempt-") or not attempt_dir.is_dir():
            continue
        for file in sorted(attempt_dir.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".parquet") and storage.TMP_MARKER not in file.name:
                tables.append(storage.read_parquet(file))
    return tables


def combine_dead_letters(tables: Sequence[pa.Table | None], key_columns: Sequence[str]) -> pa.Table:
    """Prepare rejections and collection dead letters in one DEAD_LETTER table (empty if none)."""
    import pyarrow as pa

    from anthropic_batch.results import dead_letter_schema

    schema = dead_letter_schema(key_columns)
    present = [t.select(schema.names).cast(schema) for t in tables if t is not None]
    return pa.concat_tables(present) if present else schema.empty_table()


def build_summary(
    *,
    manifest: Mapping[str, Any],
    merged: pa.Table,
    dead_letters: pa.Table,
    billed: Sequence[pa.Table],
    dag_id: str | None,
    run_id: str | None,
    data_path: str,
    dead_letter_path: str,
    price_table_as_of: str,
    sample_cost_usd: float | None = None,
) -> dict[str, Any]:
    """The run summary (ARCHITECTURE.md, summary.json). Cost and tokens count every attempt;
    ``cost_usd`` and ``sync_cost_usd`` include the sample gate's ``sample_cost_usd``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    spec = manifest.get("spec") or {}
    spend = pa.concat_tables(billed, promote_options="permissive") if billed else merged
    cost = float(_sum(spend, "cost_usd"))
    sync_cost = float(_sum(spend, "sync_cost_usd"))
    batch_ids = sorted(
        {b for b in spend.column("batch_id").to_pylist() if b} if "batch_id" in spend.column_names else set()
    )
    attempts = int(pc.max(merged["attempt"]).as_py() or 0) if merged.num_rows else 0
    # -- sample gate cost (sample helper): the sample's answers were paid at the synchronous price,
    # so they add to the cost and to its synchronous equivalent alike (savings unchanged).
    sample_cost = float(sample_cost_usd or 0.0)
    cost += sample_cost
    sync_cost += sample_cost
    # -- end sample gate cost
    summary = {
        "pipeline": spec.get("pipeline"),
        "dag_id": dag_id,
        "run_id": run_id,
        "partition": spec.get("partition"),
        "mode": manifest.get("mode"),
        "model": spec.get("model"),
        "n_input_records": manifest.get("n_input_records"),
        "n_requests": manifest.get("n_requests"),
        "n_rows": merged.num_rows,
        "counts_by_status": _counts(merged, "status"),
        "n_dead_letters": dead_letters.num_rows,
        "n_dead_letters_by_stage": _counts(dead_letters, "stage"),
        "tokens": {name: int(_sum(spend, column)) for name, column in _TOKEN_COLUMNS.items()},
        "cost_usd": round(cost, 6),
        "sync_cost_usd": round(sync_cost, 6),
        "savings_usd": round(sync_cost - cost, 6),
        "batch_ids": batch_ids,
        "attempts": attempts,
        "price_table_as_of": price_table_as_of,
        "data_path": data_path,
        "dead_letter_path": dead_letter_path,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    if sample_cost_usd is not None:
        summary["sample_cost_usd"] = round(sample_cost_usd, 6)
    return summary


def _write_partition_files(
    directory: ObjectStoragePath, merged: pa.Table, dead_letters: pa.Table, summary: dict[str, Any]
) -> None:
    storage.write_parquet_atomic(directory / DATA_FILE, merged)
    storage.write_parquet_atomic(directory / DEAD_LETTER_FILE, dead_letters)
    storage.atomic_write_json(directory / SUMMARY_FILE, summary)
    storage.atomic_write_bytes(directory / SUCCESS_MARKER, b"")


def publish_partition(
    target: ObjectStoragePath, merged: pa.Table, dead_letters: pa.Table, summary: dict[str, Any]
) -> None:
    """Write the partition at ``target``, replacing an earlier one without exposing a mix."""
    if storage.is_local(target):
        staging = target.parent / f".{target.name}{storage.TMP_MARKER}{uuid.uuid4().hex}"
        final, trash = target.path, f"{staging.path}.old"
        os.makedirs(target.parent.path, exist_ok=True)
        try:
            _write_partition_files(staging, merged, dead_letters, summary)
            if os.path.exists(final):
                os.replace(final, trash)
            os.replace(staging.path, final)
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            if os.path.exists(trash) and not os.path.exists(final):
                os.replace(trash, final)  # put the previous partition back
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        (target / SUCCESS_MARKER).unlink()
    _write_partition_files(target, merged, dead_letters, summary)


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
        manifest = storage.read_json(work_dir / "requests" / "manifest.json")
        if manifest is None:
            raise FileNotFoundError(f"no manifest at {work_dir / 'requests' / 'manifest.json'}")
        merged = storage.read_parquet(self.merged_path)
        key_columns = (manifest.get("spec") or {}).get("key_columns") or []
        dead_letters = combine_dead_letters(
            [_read_optional(work_dir / "rejected.parquet"), _read_optional(work_dir / "dead_letter.parquet")],
            key_columns,
        )
        sample_report = storage.read_json(work_dir / "sample" / "report.json")
        ti = context["ti"]
        summary = build_summary(
            manifest=manifest,
            merged=merged,
            dead_letters=dead_letters,
            billed=attempt_tables(work_dir, self.merged_path),
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            data_path=str(target / DATA_FILE),
            dead_letter_path=str(target / DEAD_LETTER_FILE),
            price_table_as_of=load_price_table().as_of,
            sample_cost_usd=(sample_report or {}).get("sample_cost_usd"),
        )
        if self.pipeline:
            summary["pipeline"] = self.pipeline
        # -- mode=sync taking over batches in flight (sync_backend): answers reused, requests paid twice.
        from anthropic_batch.sync_backend import takeover_summary

        takeover = takeover_summary(work_dir)
        if takeover is not None:
            summary["sync_takeover"] = takeover
        # -- end mode=sync
        publish_partition(target, merged, dead_letters, summary)
        log.info(
            "Published %s: %d rows %s, %d dead letters; cost $%.4f (sync would be $%.4f, saved $%.4f).",
            target,
            summary["n_rows"],
            summary["counts_by_status"],
            summary["n_dead_letters"],
            summary["cost_usd"],
            summary["sync_cost_usd"],
            summary["savings_usd"],
        )
        return summary
