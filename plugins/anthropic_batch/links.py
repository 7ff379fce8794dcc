"""Extra links on task instances: the batch in the Anthropic Console, and a run's results.

In Airflow 3 the worker calls ``get_link`` at the end of each segment (including a deferral) and
stores the URL in XCom; the UI reads that. So ``get_link`` may only use what the worker can see:

- the batch id from the rendered ``handle`` of the operator (sensor, collect: the BatchHandle or a
  bare id), else from the XCom key ``batch_id`` that SubmitBatchOperator pushes *as soon as* the
  batch exists (so the link is there even if the task fails later in the segment);
- the results path from the task's return value (a path string, a dict with ``data_path`` /
  ``results_path``), else from the rendered handle's ``results_path``.

An empty string means "no link": a ``mode="sync"`` handle (told by its mode) has no Console page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperatorLink

from anthropic_batch.status import RunMode

CONSOLE_BATCH_URL = "https://console.anthropic.com/workspaces/default/batches/{batch_id}"
BATCH_ID_XCOM_KEY = "batch_id"


def _xcom(ti_key: Any, key: str) -> Any:
    # Airflow's module only on this path: callers that never take it stay light
    from airflow.sdk.execution_time.xcom import XCom

    try:
        return XCom.get_value(ti_key=ti_key, key=key)
    except Exception:  # no XCom yet, or not inside a task runner
        return None


def console_url(batch_id: str | None) -> str:
    """The Console URL of a batch id; empty for none."""
    if not batch_id:
        return ""
    return CONSOLE_BATCH_URL.format(batch_id=batch_id)


def batch_id_from(value: Any) -> str | None:
    """A batch id from a string, a BatchHandle dict or a batch dict; None for a synchronous run."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("mode") == RunMode.SYNC:
            return None  # a synchronous run is no batch (older handles carried a fake "sync_" id)
        return value.get("batch_id") or value.get("id")
    return None


def results_location_from(value: Any) -> str | None:
    """A results location from a path string or a dict carrying one."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        for key in ("data_path", "merged_path", "results_path", "path"):
            if value.get(key):
                return str(value[key])
    return None


def as_url(location: str) -> str:
    """Local paths become ``file://`` URLs; URLs pass through."""
    if "://" in location:
        return location

    return Path(location).resolve().as_uri()


class AnthropicConsoleBatchLink(BaseOperatorLink):
    """Link to the batch's page in the Anthropic Console."""

    name = "Anthropic Console"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        # An operator given a handle (sensor, collect) knows its batch without an XCom lookup (which
        # would log a not-found error for every such task); submit pushes "batch_id".
        batch_id = batch_id_from(getattr(operator, "handle", None))
        if not batch_id:
            batch_id = batch_id_from(_xcom(ti_key, BATCH_ID_XCOM_KEY))
        return console_url(batch_id)


class RunResultsLink(BaseOperatorLink):
    """Link to the results (or published extraction) this task produced."""

    name = "Run results"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        location = results_location_from(_xcom(ti_key, "return_value"))
        if not location:
            location = results_location_from(getattr(operator, "handle", None))
        return as_url(location) if location else ""
