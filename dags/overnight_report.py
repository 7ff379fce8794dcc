"""Airflow DAG `overnight_report`: the day's support-ticket extraction as an HTML + Markdown report.

Runs when `bulk_extraction` publishes a partition (its Asset) and, as a safety net, every morning at
06:30 UTC. It aggregates the day's extraction per ticket category, asks the model for one short
narrative per category in **one** Message Batch (prepare -> submit -> wait -> collect -> resubmit,
the same operators as every pipeline), and renders `reports/date=YYYY-MM-DD/report.html` (inline
SVG charts: volumes, status breakdown, cost and savings over the last days) and `report.md`.

Report date: param `date` if given; else the partition of the triggering `bulk_extraction` run;
else (time-triggered) the day before the run. Without a published partition the run is skipped.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, task

from anthropic_batch.dag_factory import add_batch_stage, storage_root_url
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.operators.resubmit import ResubmitFailuresOperator
from anthropic_batch.pipeline_config import INCLUDE_DIR, PIPELINES_DIR, POOL_NAME, load_pipeline

SOURCE_PIPELINE = "bulk_extraction"
REPORT_PIPELINE = "overnight_report"
SOURCE_ASSET = Asset(f"anthropic-batch://{SOURCE_PIPELINE}/extractions")
REPORT_MODEL = "claude-haiku-4-5"
# The report reads and writes under the source pipeline's storage root (its YAML override, if any).
SOURCE_STORAGE_ROOT = load_pipeline(PIPELINES_DIR / f"{SOURCE_PIPELINE}.yaml").storage_root


def _plan_value(key: str) -> str:
    return "{{ ti.xcom_pull(task_ids='plan')['" + key + "'] }}"


def _report_date(params: dict[str, Any], context: dict[str, Any]) -> str:
    if params.get("date"):
        return dt.date.fromisoformat(str(params["date"])).isoformat()
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            run = event.source_dag_run
            if run is not None and event.source_dag_id == SOURCE_PIPELINE:
                when = run.data_interval_start or run.logical_date or run.run_after
                return when.date().isoformat()
    run_after = context["dag_run"].run_after
    return (run_after - dt.timedelta(days=1)).date().isoformat()


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
            None, type=["null", "string"], description="report date YYYY-MM-DD (default: see docs)"
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
        """Pick the date, aggregate the published partition, write the per-category prompt table."""
        from airflow.sdk.exceptions import AirflowSkipException

        from anthropic_batch import partition, report, storage

        date = _report_date(params, context)
        root = storage.storage_root(SOURCE_STORAGE_ROOT)
        extraction = storage.extraction_dir(root, SOURCE_PIPELINE, date)
        if partition.published_files(extraction) is None:
            raise AirflowSkipException(f"no published {SOURCE_PIPELINE} partition for {date} at {extraction}")
        aggregates = report.aggregate_partition(extraction)
        aggregates["date"] = date
        aggregates["history"] = report.load_history(root, SOURCE_PIPELINE, date, int(params["history_days"]))
        work = storage.work_dir(root, REPORT_PIPELINE, date)
        storage.atomic_write_json(work / "aggregates.json", aggregates)
        rows = report.group_prompt_rows(aggregates)
        if not rows:
            raise AirflowSkipException(f"{SOURCE_PIPELINE} {date} has no classified rows to report on")
        groups = work / "inputs" / "groups.jsonl"
        storage.atomic_write_bytes(
            groups, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        )
        return {
            "date": date,
            "work_dir": str(work),
            "groups_path": str(groups),
            "report_dir": str(storage.report_dir(root, date)),
        }

    planned = plan()
    prepare = PrepareRequestsOperator(
        task_id="prepare",
        source=_plan_value("groups_path"),
        source_format="jsonl",
        key_columns=["category"],
        prompt_template="prompts/report_group.j2",
        model=REPORT_MODEL,
        max_tokens=400,
        system_prompt="You write calm, factual summaries for a support operations report.",
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
    def render(planned: dict[str, Any], merged_path: str) -> dict[str, str]:
        """Attach the narratives and write report.json, report.html and report.md."""
        from anthropic_batch import report, storage
        from anthropic_batch.pricing import load_price_table

        aggregates = storage.read_json(storage.as_path(planned["work_dir"]) / "aggregates.json")
        results = storage.read_parquet(merged_path)
        aggregates = report.attach_narratives(aggregates, results)
        aggregates["generated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        aggregates["price_table_as_of"] = load_price_table().as_of
        return report.write_report(planned["report_dir"], aggregates)

    planned >> prepare
    render(planned, merged.output)
