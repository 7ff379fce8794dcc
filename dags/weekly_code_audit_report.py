"""Airflow DAG `weekly_code_audit_report`: the weekly code audit's findings as an HTML + Markdown report.

Runs when `weekly_code_audit` publishes a week (its Asset). It reads that week's published findings
and the previous week's, and writes `reports/weekly_code_audit/date=YYYY-MM-DD/report.html`,
`report.md` and `report.json` (beside the overnight report's `reports/date=...`): findings by
severity and by file, the trend against the previous week (new, resolved and total per severity)
and the run's cost with cache writes, cache reads and the savings from caching and batching.

A DAG of its own rather than a task of the audit's DAG: the pipeline DAGs stay generic (one factory
for every YAML file), a report that fails to render never marks the published findings failed, and
any week can be re-rendered alone (param `date`, `YYYY-MM-DD`, several separated by commas). It
calls no model: one task, seconds. Without the param it reports every week of the triggering
events, or, run by hand, the latest published week.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, Asset, Param, task

from anthropic_batch.pipeline_config import PIPELINES_DIR, PipelineConfigError, load_pipeline

log = logging.getLogger(__name__)

SOURCE_PIPELINE = "weekly_code_audit"
SOURCE_ASSET = Asset(f"anthropic-batch://{SOURCE_PIPELINE}/extractions")


def _source_settings() -> tuple[str | None, str | None, str | None]:
    """``(storage_root, schedule, output_model)`` of the audit pipeline; defaults when its file is
    invalid (dags/pipeline_errors.py reports that; it must not become an import error here too)."""
    try:
        config = load_pipeline(PIPELINES_DIR / f"{SOURCE_PIPELINE}.yaml")
    except PipelineConfigError:
        return None, "0 3 * * 1", None
    return config.storage_root, config.schedule, config.output_model


SOURCE_STORAGE_ROOT, SOURCE_SCHEDULE, SOURCE_OUTPUT_MODEL = _source_settings()

with DAG(
    dag_id=f"{SOURCE_PIPELINE}_report",
    description="Weekly HTML/Markdown report of the code audit: findings by severity and file, trend, cost",
    doc_md=__doc__,
    schedule=[SOURCE_ASSET],
    start_date=dt.datetime(2026, 10, 5, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["anthropic-batch", "report", "code", "audit"],
    default_args={"owner": "platform-engineering", "retries": 1, "retry_delay": dt.timedelta(seconds=30)},
    params={
        "date": Param(
            None,
            type=["null", "string"],
            description="audit week (its Monday) YYYY-MM-DD, or several separated by commas "
            "(default: the triggering weeks, else the latest published week)",
        ),
    },
) as dag:

    @task
    def render(params: dict[str, Any], **context: Any) -> dict[str, dict[str, str]]:
        """Build and write one report per week; a week that is not published is skipped (logged)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from anthropic_batch import audit_report, partition, report, storage
        from anthropic_batch.pricing import load_price_table

        root = storage.storage_root(SOURCE_STORAGE_ROOT)
        if params.get("date") or context.get("triggering_asset_events"):
            dates = report.report_dates(
                params.get("date"),
                context.get("triggering_asset_events"),
                context["dag_run"].run_after,
                source_dag_id=SOURCE_PIPELINE,
                schedule=SOURCE_SCHEDULE,
            )
        else:
            latest = audit_report.latest_published(root, SOURCE_PIPELINE)
            dates = [latest] if latest else []
        written: dict[str, dict[str, str]] = {}
        for date in dates:
            if partition.published_files(storage.extraction_dir(root, SOURCE_PIPELINE, date)) is None:
                log.warning("No published %s partition for %s: no report.", SOURCE_PIPELINE, date)
                continue
            content = audit_report.build_audit_report(
                root, date, SOURCE_PIPELINE, SOURCE_OUTPUT_MODEL or audit_report.OUTPUT_MODEL
            )
            content["generated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            content["price_table_as_of"] = content.get("price_table_as_of") or load_price_table().as_of
            target = storage.pipeline_report_dir(root, SOURCE_PIPELINE, date)
            written[date] = audit_report.write_audit_report(target, content)
            log.info(
                "%s %s: %d finding(s) in %d file(s) -> %s",
                SOURCE_PIPELINE,
                date,
                content["n_findings"],
                content["n_files_reviewed"],
                written[date]["html"],
            )
        if not written:
            raise AirflowSkipException(f"no published {SOURCE_PIPELINE} week among {dates or 'none'}")
        return written

    render()
