"""What the Batches page shows, read from the storage root (never from the metadata database).

Batches come from the submission ledger (``_ledger/**/*.json``, one ``LedgerEntry`` per submission),
runs from the published run summaries (``{pipeline}/extractions/date=*/summary.json``) joined with
the ledger entries of the same ``(dag_id, partition)``, so a run still in flight (no summary yet)
shows up too. Both are read through ``run_index`` (a listing, the index, and only the files that
changed), so a page load costs a handful of requests on an object store, not one per file. Dead
letters are read from ``dead_letter.parquet`` on demand, one run at a time.

Everything here returns plain JSON-ready dicts: the HTML templates and the JSON API share them.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from anthropic_batch.status import (
    FAILED_COUNT_KEYS,
    REQUEST_COUNT_KEYS,
    LedgerState,
    ProcessingStatus,
    RequestCountKey,
    RunMode,
)

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from anthropic_batch.contracts import RunSummary

log = logging.getLogger(__name__)

PARTITION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: An Anthropic API key anywhere in text we display (defence in depth: none should ever be stored).
API_KEY_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]{4,}")
# REQUEST_COUNT_KEYS and FAILED_COUNT_KEYS come from status.py (imported above).
ACTIVE_STATUSES = frozenset({ProcessingStatus.IN_PROGRESS.value, ProcessingStatus.CANCELING.value})
#: Longest text cell shown in the HTML dead-letter table (the JSON API returns the full text).
MAX_CELL_CHARS = 400


def redact(value: Any) -> Any:
    """``value`` with anything shaped like an Anthropic API key replaced; non-strings unchanged."""
    if isinstance(value, str):
        return API_KEY_RE.sub("sk-ant-…[redacted]", value)
    return value


def parse_time(value: Any) -> datetime | None:
    """An aware UTC datetime from RFC 3339 text (``Z`` or an offset); None when missing or unreadable."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _savings(cost: float | None, sync_cost: float | None) -> float | None:
    if cost is None or sync_cost is None:
        return None
    return sync_cost - cost


# -- reading -------------------------------------------------------------------------------------------
def read_ledger_entries(
    root: ObjectStoragePath, dag_id: str | None = None, partition: str | None = None
) -> list[dict[str, Any]]:
    """Ledger entries under ``root`` (optionally of one DAG / partition); temporary files skipped.

    Read through the validated index (``run_index``): a listing, the index, and only the entries
    that changed since it was written.
    """
    # the plugin (imported by every Airflow component) loads this module: storage only on use
    from anthropic_batch import run_index

    return run_index.ledger_entries(root, dag_id=dag_id, partition=partition)


def read_summaries(root: ObjectStoragePath, partition: str | None = None) -> list[RunSummary]:
    """Published run summaries (optionally of one partition); unreadable files are logged and skipped."""
    # the plugin (imported by every Airflow component) loads this module: storage only on use
    from anthropic_batch import run_index

    return run_index.summaries(root, partition=partition)


# -- batches -----------------------------------------------------------------------------------------
def batch_status(entry: dict[str, Any]) -> str:
    """What a user should read as the batch's status."""
    state = entry.get("state")
    ended = ProcessingStatus.ENDED.value
    if state == LedgerState.INTENT:
        return "submitting"
    if entry.get("mode") == RunMode.SYNC:
        return ended if state == LedgerState.ENDED else "running"
    in_progress = ProcessingStatus.IN_PROGRESS.value
    return entry.get("processing_status") or (ended if state == LedgerState.ENDED else in_progress)


def batch_badge(status: str, counts: dict[str, int]) -> str:
    """The badge style for a status: ok, partial, failed, active, warn or muted."""
    if status in ACTIVE_STATUSES or status == "running":
        return "warn" if status == ProcessingStatus.CANCELING else "active"
    if status == ProcessingStatus.ENDED:
        total = sum(counts.values())
        failed = sum(counts[k] for k in FAILED_COUNT_KEYS)
        if not total:
            return "muted"  # no counts recorded: nothing to judge by
        if failed == total:
            return "failed"
        return "partial" if failed else "ok"
    return "muted"


def batch_row(entry: dict[str, Any], now: datetime) -> dict[str, Any]:
    """One ledger entry (validated: ``contracts.LedgerEntry``, as ``run_index`` returns them) as a
    Batches table row."""
    raw_counts = entry.get("request_counts") or {}
    counts = {k: int(raw_counts.get(k) or 0) for k in REQUEST_COUNT_KEYS}
    status = batch_status(entry)
    expires_at = parse_time(entry.get("expires_at"))
    expires_in = None
    if expires_at is not None and status in ACTIVE_STATUSES:
        expires_in = (expires_at - now).total_seconds()
    cost = entry.get("cost_usd")
    sync_cost = entry.get("sync_cost_usd")
    return {
        # A sync run (no batch) shows its run id here, as it did when it was stored as batch_id.
        "batch_id": redact(entry.get("batch_id") or entry.get("sync_run_id")),
        "ledger_key": redact(entry.get("ledger_key")),
        "dag_id": entry.get("dag_id"),
        "run_id": entry.get("run_id"),
        "partition": entry.get("partition"),
        "pipeline": entry.get("pipeline"),
        "task_id": entry.get("task_id"),
        "map_index": entry.get("map_index"),
        "attempt": entry.get("attempt"),
        "mode": entry.get("mode") or "batch",
        "model": entry.get("model"),
        "state": entry.get("state"),
        "status": status,
        # What the Cancel action needs: a real batch still in progress (a sync run is never one).
        "cancelable": status == ProcessingStatus.IN_PROGRESS
        and (entry.get("mode") or RunMode.BATCH) == RunMode.BATCH
        and bool(entry.get("batch_id")),
        "badge": batch_badge(status, counts),
        "n_requests": entry.get("n_requests"),
        "request_counts": counts,
        "n_failed": sum(counts[k] for k in FAILED_COUNT_KEYS),
        "created_at": entry.get("created_at") or entry.get("submitted_at") or entry.get("intent_at"),
        "ended_at": entry.get("ended_at"),
        "expires_at": entry.get("expires_at"),
        "expires_in_seconds": expires_in,
        "projected_cost_usd": entry.get("projected_cost_usd"),
        "cost_usd": cost,
        "sync_cost_usd": sync_cost,
        "savings_usd": _savings(cost, sync_cost),
        "previous_batch_ids": [redact(b) for b in entry.get("previous_batch_ids") or []],
        # Other batches the ledger knows for this chunk, and why (what a human checks in the Console).
        "other_batches": [
            (label, redact(b)) for field, label in OTHER_BATCH_FIELDS for b in entry.get(field) or []
        ],
        "identity_verified": entry.get("identity_verified"),
    }


#: Ledger fields naming other batches of a chunk, with how the Batches page labels them.
OTHER_BATCH_FIELDS = (
    ("previous_batch_ids", "replaced"),
    ("duplicate_batch_ids", "duplicate, canceled"),
    ("foreign_batch_ids", "not this chunk's"),
    ("taken_over_batch_ids", "taken over by mode=sync"),
)


def _sort_time(row: dict[str, Any]) -> datetime:
    return parse_time(row.get("created_at")) or datetime.min.replace(tzinfo=UTC)


# -- runs --------------------------------------------------------------------------------------------
def run_row(
    dag_id: str, partition: str, summary: RunSummary | None, batches: list[dict[str, Any]]
) -> dict[str, Any]:
    """One run (a DAG's partition): its published summary if any, else what its batches say so far."""
    batch_cost = [b["cost_usd"] for b in batches if b["cost_usd"] is not None]
    batch_sync = [b["sync_cost_usd"] for b in batches if b["sync_cost_usd"] is not None]
    active = any(b["badge"] in ("active", "warn") or b["status"] == "submitting" for b in batches)
    attempts = max((int(b["attempt"]) for b in batches if isinstance(b.get("attempt"), int)), default=None)
    run: dict[str, Any] = {
        "dag_id": dag_id,
        "partition": partition,
        "pipeline": next((b["pipeline"] for b in batches if b.get("pipeline")), None),
        "run_id": next((b["run_id"] for b in batches if b.get("run_id")), None),
        "mode": next((b["mode"] for b in batches), None),
        "n_batches": len(batches),
        "n_active_batches": sum(1 for b in batches if b["badge"] in ("active", "warn")),
        "attempts": attempts,
        "published": summary is not None,
        "status": "running" if active else ("published" if summary is not None else "collecting"),
        "n_input_records": None,
        "n_rows": sum(b["n_requests"] or 0 for b in batches) or None,
        "counts_by_status": {},
        "n_succeeded": sum(b["request_counts"][RequestCountKey.SUCCEEDED] for b in batches),
        "n_dead_letters": None,
        "cost_usd": sum(batch_cost) if batch_cost else None,
        "sync_cost_usd": sum(batch_sync) if batch_sync else None,
        "finished_at": None,
        "price_table_as_of": None,
        "tokens": {},
        "n_reused": None,  # answer reuse (issue 9): from the summary
        "reused_cost_usd": None,
        "cost_breakdown": None,  # issue 13: cache writes/reads and both savings, from the summary
    }
    if summary is not None:
        # Validated when read (run_index): the numbers are numbers, a bad file never gets here.
        counts = dict(summary.counts_by_status)
        run.update(
            pipeline=summary.pipeline or run["pipeline"],
            run_id=summary.run_id or run["run_id"],
            mode=summary.mode or run["mode"],
            attempts=summary.attempts or run["attempts"],
            n_input_records=summary.n_input_records,
            n_rows=summary.n_rows,
            counts_by_status=counts,
            n_succeeded=counts.get(RequestCountKey.SUCCEEDED, 0),
            n_dead_letters=summary.n_dead_letters,
            cost_usd=summary.cost_usd,
            sync_cost_usd=summary.sync_cost_usd,
            finished_at=summary.finished_at,
            price_table_as_of=summary.price_table_as_of,
            tokens=dict(summary.tokens),
        )
        if summary.savings_usd is not None:
            run["savings_usd"] = summary.savings_usd
        # Answer reuse (issue 9): answers taken from earlier runs, and what they had cost then.
        run["n_reused"] = summary.n_reused
        run["reused_cost_usd"] = summary.reused_cost_usd
        # Issue 13: none in summaries written before the breakdown existed.
        breakdown = summary.cost_breakdown
        run["cost_breakdown"] = breakdown.model_dump() if breakdown is not None else None
    run.setdefault("savings_usd", _savings(run["cost_usd"], run["sync_cost_usd"]))
    n_rows = run["n_rows"] or 0
    run["success_rate"] = (run["n_succeeded"] / n_rows) if n_rows and run["published"] else None
    return run


def cost_breakdown_rows(breakdown: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The cost section's rows (what, tokens, USD) for a template; empty without a breakdown."""
    from anthropic_batch.pricing import CostBreakdown

    if not breakdown:
        return []
    return [
        {"label": label, "tokens": tokens, "usd": usd}
        for label, tokens, usd in CostBreakdown(**breakdown).table_rows()
    ]


def _run_sort_key(run: dict[str, Any]) -> tuple[str, str]:
    return (run["partition"] or "", run["dag_id"] or "")


def build_overview(
    entries: Iterable[dict[str, Any]],
    summaries: Iterable[RunSummary],
    now: datetime | None = None,
    allowed_dag_ids: set[str] | None = None,
) -> dict[str, Any]:
    """Batches (newest first), runs (newest first), totals and chart series for the Batches page.

    ``allowed_dag_ids`` (None = all) limits everything to the DAGs the user may read.
    """
    now = now or datetime.now(UTC)
    batches = [batch_row(e, now) for e in entries]
    summaries = list(summaries)
    if allowed_dag_ids is not None:
        batches = [b for b in batches if b["dag_id"] in allowed_dag_ids]
        summaries = [s for s in summaries if s.dag_id in allowed_dag_ids]
    batches.sort(key=_sort_time, reverse=True)

    by_run: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for b in batches:
        by_run[(b["dag_id"] or "", b["partition"] or "")].append(b)
    summary_by_run = {(s.dag_id or "", s.partition or ""): s for s in summaries}
    runs = [
        run_row(
            dag_id, partition, summary_by_run.get((dag_id, partition)), by_run.get((dag_id, partition), [])
        )
        for dag_id, partition in set(by_run) | set(summary_by_run)
    ]
    runs.sort(key=_run_sort_key, reverse=True)
    return {"batches": batches, "runs": runs, "totals": totals(batches, runs), "series": series(runs)}


def _sum_breakdowns(breakdowns: list[dict[str, Any]]) -> dict[str, Any] | None:
    from anthropic_batch.pricing import CostBreakdown

    if not breakdowns:
        return None
    total = CostBreakdown()
    for item in breakdowns:
        total += CostBreakdown(**item)
    return total.model_dump()


def totals(batches: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers: money per run (the summaries are final), batches and requests per batch."""
    cost = [r["cost_usd"] for r in runs if r["cost_usd"] is not None]
    sync = [r["sync_cost_usd"] for r in runs if r["sync_cost_usd"] is not None]
    savings = [r["savings_usd"] for r in runs if r["savings_usd"] is not None]
    published = [r for r in runs if r["published"] and r["n_rows"]]
    n_rows = sum(r["n_rows"] for r in published)
    total_sync = sum(sync) if sync else None
    total_savings = sum(savings) if savings else None
    breakdowns = [r["cost_breakdown"] for r in runs if r.get("cost_breakdown")]
    return {
        "cost_breakdown": _sum_breakdowns(breakdowns),
        "n_runs_with_breakdown": len(breakdowns),
        "n_batches": len(batches),
        "n_active": sum(1 for b in batches if b["badge"] in ("active", "warn")),
        "n_runs": len(runs),
        "n_requests": sum(b["n_requests"] or 0 for b in batches),
        "cost_usd": sum(cost) if cost else None,
        "sync_cost_usd": total_sync,
        "savings_usd": total_savings,
        "savings_pct": (total_savings / total_sync) if total_sync and total_savings is not None else None,
        "success_rate": (sum(r["n_succeeded"] for r in published) / n_rows) if n_rows else None,
    }


def series(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per partition date, oldest first: cost, synchronous cost, savings and success rate of its runs."""
    by_date: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["partition"]:
            by_date[r["partition"]].append(r)
    points = []
    for date in sorted(by_date):
        rs = by_date[date]
        published = [r for r in rs if r["published"] and r["n_rows"]]
        n_rows = sum(r["n_rows"] for r in published)
        points.append(
            {
                "date": date,
                "cost_usd": sum(r["cost_usd"] or 0.0 for r in rs),
                "sync_cost_usd": sum(r["sync_cost_usd"] or 0.0 for r in rs),
                "savings_usd": sum(r["savings_usd"] or 0.0 for r in rs),
                "success_rate": (sum(r["n_succeeded"] for r in published) / n_rows) if n_rows else None,
            }
        )
    return points


def find_run(overview: dict[str, Any], dag_id: str, partition: str) -> dict[str, Any] | None:
    return next((r for r in overview["runs"] if r["dag_id"] == dag_id and r["partition"] == partition), None)


def partition_of_run_id(
    entries: Iterable[dict[str, Any]], summaries: Iterable[RunSummary], dag_id: str, run_id: str
) -> str | None:
    """The partition an Airflow run worked on, from its summary or any of its ledger entries."""
    for summary in summaries:
        if summary.dag_id == dag_id and summary.run_id == run_id and summary.partition:
            return summary.partition
    for item in entries:
        if item.get("dag_id") == dag_id and item.get("run_id") == run_id and item.get("partition"):
            return str(item["partition"])
    return None


# -- dead letters ------------------------------------------------------------------------------------
def dead_letter_path(root: ObjectStoragePath, pipeline: str, partition: str) -> ObjectStoragePath:
    """Where a run's published dead letters are (always derived from the layout, never from input)."""
    # the plugin (imported by every Airflow component) loads this module: storage only on use
    from anthropic_batch.layout import extraction_dir
    from anthropic_batch.partition import DEAD_LETTER_FILE, published_files

    directory = extraction_dir(root, pipeline, partition)
    published = published_files(directory)  # the committed generation's file
    return published.dead_letter_path if published is not None else directory / DEAD_LETTER_FILE


def read_dead_letters(path: ObjectStoragePath, limit: int = 200) -> dict[str, Any]:
    """The first ``limit`` dead-letter rows and the failure counts by reason over all of them.

    An unreadable file is reported in ``error`` (the rest of the run page still renders).
    """
    # pyarrow: kept out of the plugin's import (every Airflow component)
    import pyarrow as pa

    empty = {"exists": False, "total": 0, "columns": [], "rows": [], "by_reason": [], "error": None}
    if not path.exists():
        return empty
    try:
        return _read_dead_letters(path, limit)
    except (OSError, pa.ArrowException) as exc:
        log.warning("Unreadable dead-letter file %s: %s", path, exc)
        return {
            **empty,
            "exists": True,
            "error": f"The dead-letter file could not be read: {redact(str(exc))}",
        }


def _read_dead_letters(path: ObjectStoragePath, limit: int) -> dict[str, Any]:
    # pyarrow: kept out of the plugin's import (every Airflow component)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with path.open("rb") as handle:
        parquet = pq.ParquetFile(handle)
        total = parquet.metadata.num_rows
        columns = parquet.schema_arrow.names
        group_cols = [c for c in ("stage", "status", "error_type", "reason") if c in columns]
        rows: list[dict[str, Any]] = []
        if limit > 0 and total:
            first = next(parquet.iter_batches(batch_size=limit), None)
            if first is not None:
                rows = [{k: redact(v) for k, v in row.items()} for row in first.to_pylist()]
        by_reason: list[dict[str, Any]] = []
        if group_cols and total:
            table = parquet.read(columns=group_cols)
            # A reason may embed a per-record detail at its end; grouping on its first 200 characters keeps
            # the list short while still separating the different kinds of failure.
            if "reason" in group_cols:
                first_line = pc.utf8_slice_codeunits(
                    pc.fill_null(pc.cast(table["reason"], "string"), ""), 0, 200
                )
                table = table.set_column(group_cols.index("reason"), "reason", first_line)
            counted = table.group_by(group_cols, use_threads=False).aggregate([([], "count_all")])
            by_reason = [{k: redact(v) for k, v in row.items()} for row in counted.to_pylist()]
            for row in by_reason:
                row["count"] = row.pop("count_all")
            by_reason.sort(key=lambda r: (-r["count"], str(r.get("reason"))))
    return {
        "exists": True,
        "total": total,
        "columns": columns,
        "rows": rows,
        "by_reason": by_reason,
        "error": None,
    }
