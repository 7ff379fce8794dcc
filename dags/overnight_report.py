"""Airflow DAG `overnight_report`: the day's support-ticket extraction as an HTML + Markdown report.

Runs when `bulk_extraction` publishes a partition (its Asset) and, as a safety net, every morning at
06:30 UTC. It aggregates the day's extraction per ticket category, asks the model for one short
narrative per category in **one** Message Batch (prepare -> submit and wait -> collect -> resubmit,
the same operators as every pipeline), and renders `reports/date=YYYY-MM-DD/report.html` (inline
SVG charts: volumes, status breakdown, cost and savings over the last days) and `report.md`.

Report dates: param `date` if given (`YYYY-MM-DD`, or several separated by commas); else **every**
partition published by the triggering `bulk_extraction` runs (Airflow collapses the Asset events
that arrive while a report run waits into one run, e.g. the dates of a backfill: each date gets its
own report, and all their narratives go out in one batch); else (time-triggered) the day before the
run. Without the param, the run also takes every published date without a report from
`history_days` before its first date up to yesterday: Airflow hands an event that arrives while a
report run is being queued to the *next* run, which would otherwise wait for the next publication.
Dates without a published partition are skipped (logged); with none at all the run is skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import yaml
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from anthropic_batch.dag_factory import add_batch_stage, storage_root_url
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.operators.resubmit import ResubmitFailuresOperator
from anthropic_batch.pipeline_config import (
    INCLUDE_DIR,
    PIPELINES_DIR,
    POOL_NAME,
    PipelineConfigError,
    load_pipeline,
)

log = logging.getLogger(__name__)

SOURCE_PIPELINE = "bulk_extraction"
REPORT_PIPELINE = "overnight_report"
SOURCE_ASSET = Asset(f"anthropic-batch://{SOURCE_PIPELINE}/extractions")
REPORT_MODEL = "claude-haiku-4-5"


def _source_settings() -> tuple[str | None, str | None]:
    """``(storage_root, schedule)`` of the source pipeline, even when its file is invalid.

    An invalid bulk_extraction.yaml is reported by dags/pipeline_errors.py; the report must not turn
    it into an import error of its own (that would mark this DAG stale as well).
    """
    path = PIPELINES_DIR / f"{SOURCE_PIPELINE}.yaml"
    try:
        config = load_pipeline(path)
        return config.storage_root, config.schedule
    except PipelineConfigError:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            raw = None
        raw = raw if isinstance(raw, dict) else {}
        return raw.get("storage_root"), raw.get("schedule", "@daily")


# The report reads and writes under the source pipeline's storage root (its YAML override, if any).
SOURCE_STORAGE_ROOT, SOURCE_SCHEDULE = _source_settings()


def _plan_value(key: str) -> str:
    return "{{ ti.xcom_pull(task_ids='plan')['" + key + "'] }}"


with DAG(
    dag_id=REPORT_PIPELINE,
    description="Nightly HTML/Markdown report of the support-ticket extraction, narrated per category",
    doc_md=__doc__,
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 6 * * *", timezone="UTC"), assets=[SOURCE_ASSET]
    ),
    start_date=dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["anthropic-batch", "report", "support"],
    default_args={"owner": "support-analytics", "retries": 1, "retry_delay": dt.timedelta(seconds=30)},
    params={
        "date": Param(
            None,
            type=["null", "string"],
            description="report date YYYY-MM-DD, or several separated by commas (default: see docs)",
        ),
        "mode": Param(
            "batch", enum=["batch", "sync", "auto"], description="how the narratives are requested"
        ),
        "history_days": Param(14, type="integer", minimum=1, maximum=90),
    },
    user_defined_macros={"batch_storage_root": storage_root_url},
) as dag:

    @task
    def plan(params: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Pick the dates, aggregate each published partition, write one prompt table for all of them."""
        from airflow.sdk.exceptions import AirflowSkipException

        from anthropic_batch import layout, partition, report, storage

        dates = report.report_dates(
            params.get("date"),
            context.get("triggering_asset_events"),
            context["dag_run"].run_after,
            source_dag_id=SOURCE_PIPELINE,
            schedule=SOURCE_SCHEDULE,
        )
        root = storage.storage_root(SOURCE_STORAGE_ROOT)
        if not params.get("date"):
            # Also the published dates nearby that no run has reported yet (events Airflow deferred).
            run_after = context["dag_run"].run_after
            asked = dates
            dates = report.dates_to_report(
                root, SOURCE_PIPELINE, asked, run_after, int(params["history_days"])
            )
            log.info(
                "Dates of the trigger: %s; published, not yet reported: %s",
                asked,
                sorted({*dates} - {*asked}),
            )
        # The run's own partition (work dir, ledger): its latest date, a plain YYYY-MM-DD.
        work = storage.work_dir(root, REPORT_PIPELINE, dates[-1])
        rows: list[dict[str, Any]] = []
        reported: dict[str, str] = {}
        for date in dates:
            extraction = storage.extraction_dir(root, SOURCE_PIPELINE, date)
            if partition.published_files(extraction) is None:
                log.warning(
                    "No published %s partition for %s at %s: no report.", SOURCE_PIPELINE, date, extraction
                )
                continue
            aggregates = report.aggregate_partition(extraction)
            aggregates["date"] = date
            aggregates["history"] = report.load_history(
                root, SOURCE_PIPELINE, date, int(params["history_days"])
            )
            date_rows = report.group_prompt_rows(aggregates)
            if not date_rows:
                log.warning("%s %s has no classified rows to report on.", SOURCE_PIPELINE, date)
                continue
            storage.atomic_write_json(layout.report_aggregates_path(work, date), aggregates)
            rows.extend(date_rows)
            reported[date] = str(storage.report_dir(root, date))
        if not rows:
            raise AirflowSkipException(f"nothing to report for {SOURCE_PIPELINE} on {', '.join(dates)}")
        log.info("Reporting on %d date(s): %s", len(reported), ", ".join(reported))
        groups = layout.report_groups_path(work)
        storage.atomic_write_bytes(
            groups, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        )
        return {
            "date": dates[-1],
            "dates": sorted(reported),
            "work_dir": str(work),
            "groups_path": str(groups),
            "report_dirs": reported,
        }

    planned = plan()
    prepare = PrepareRequestsOperator(
        task_id="prepare",
        source=_plan_value("groups_path"),
        source_format="jsonl",
        # One batch for every date of the run: a narrative per (date, category).
        key_columns=["date", "category"],
        prompt_template="prompts/report_group.j2",
        model=REPORT_MODEL,
        max_tokens=400,
        system_prompt="You write calm, factual summaries for a support operations report.",
        # A one-line prompt for a handful of requests: far below any cacheable minimum.
        cache_system_prompt=False,
        output_model=None,
        output_mode=None,
        include_dir=str(INCLUDE_DIR),
        work_dir=_plan_value("work_dir"),
        pipeline=REPORT_PIPELINE,
        partition=_plan_value("date"),
        mode="{{ params.mode }}",
    )
    collected = add_batch_stage(
        prepare.output,
        work_dir=_plan_value("work_dir"),
        storage_root=SOURCE_STORAGE_ROOT,
        after=prepare,
        poll_interval=10.0,
        skip_if_no_chunks=True,  # a skipped plan (no partition) skips the whole report
    )
    merged = ResubmitFailuresOperator(
        task_id="resubmit",
        results_paths=collected,
        work_dir=_plan_value("work_dir"),
        max_attempts=2,
        poll_interval=10.0,
        storage_root=SOURCE_STORAGE_ROOT,
        pool=POOL_NAME,
    )

    @task
    def render(planned: dict[str, Any], merged_path: str) -> dict[str, dict[str, str]]:
        """Attach each date's narratives and write its report.json, report.html and report.md."""
        from anthropic_batch import layout, report, storage
        from anthropic_batch.pricing import load_price_table

        work = storage.as_path(planned["work_dir"])
        results = storage.read_parquet(merged_path)
        written = {}
        for date in planned["dates"]:
            aggregates = storage.read_json(layout.report_aggregates_path(work, date))
            aggregates = report.attach_narratives(aggregates, results)
            aggregates["generated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            aggregates["price_table_as_of"] = load_price_table().as_of
            written[date] = report.write_report(planned["report_dirs"][date], aggregates)
        return written

    planned >> prepare
    render(planned, merged.output)
