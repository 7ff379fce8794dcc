"""Extra links: where the batch id / results path come from, and what the URLs look like."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from anthropic_batch.links import (
    BATCH_ID_XCOM_KEY,
    AnthropicConsoleBatchLink,
    RunResultsLink,
    batch_id_from,
    console_url,
    results_location_from,
)
from anthropic_batch.sensors import AnthropicBatchSensor

TI_KEY = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=0, try_number=1)


@pytest.fixture
def xcoms(monkeypatch):
    """The task's XComs as the worker would return them (the supervisor is not running here)."""
    store: dict[str, object] = {}
    calls = []

    def get_value(*, ti_key, key):
        calls.append((ti_key, key))
        return store.get(key)

    monkeypatch.setattr(XCom, "get_value", staticmethod(get_value))
    store["_calls"] = calls
    return store


def test_console_url():
    assert (
        console_url("msgbatch_01") == "https://console.anthropic.com/workspaces/default/batches/msgbatch_01"
    )
    assert console_url(None) == ""


def test_console_link_reads_the_pushed_batch_id(xcoms):
    xcoms[BATCH_ID_XCOM_KEY] = "msgbatch_pushed"
    link = AnthropicConsoleBatchLink()
    assert isinstance(link, BaseOperatorLink) and link.name == "Anthropic Console"
    url = link.get_link(SimpleNamespace(), ti_key=TI_KEY)
    assert url.endswith("/batches/msgbatch_pushed")
    assert xcoms["_calls"] == [(TI_KEY, BATCH_ID_XCOM_KEY)]


def test_console_link_uses_the_rendered_handle_without_xcom(xcoms):
    sensor = AnthropicBatchSensor(task_id="wait", handle={"batch_id": "msgbatch_h", "mode": "batch"})
    assert AnthropicConsoleBatchLink().get_link(sensor, ti_key=TI_KEY).endswith("/batches/msgbatch_h")
    assert xcoms["_calls"] == []  # no lookup: it would log "XCom not found" on every sensor
    assert AnthropicConsoleBatchLink().get_link(SimpleNamespace(), ti_key=TI_KEY) == ""


def test_console_link_without_a_task_runner_is_empty():
    # Outside a worker XCom raises; the link must degrade to "no link", not break finalize.
    assert AnthropicConsoleBatchLink().get_link(SimpleNamespace(), ti_key=TI_KEY) == ""


def test_results_link(xcoms, tmp_path):
    link = RunResultsLink()
    xcoms["return_value"] = "s3://bucket/p/work/date=2026-11-01/results/attempt-01/msgbatch_1.parquet"
    assert link.get_link(SimpleNamespace(), ti_key=TI_KEY) == xcoms["return_value"]
    xcoms["return_value"] = {"data_path": str(tmp_path / "data.parquet"), "n_rows": 3}
    assert link.get_link(SimpleNamespace(), ti_key=TI_KEY) == (tmp_path / "data.parquet").as_uri()
    xcoms["return_value"] = None
    assert link.get_link(SimpleNamespace(handle={"results_path": "file:///r.jsonl"}), ti_key=TI_KEY) == (
        "file:///r.jsonl"
    )
    assert link.get_link(SimpleNamespace(), ti_key=TI_KEY) == ""


def test_helpers():
    assert batch_id_from({"id": "msgbatch_b"}) == "msgbatch_b"
    assert batch_id_from({"batch_id": "msgbatch_a", "id": "x"}) == "msgbatch_a"
    assert batch_id_from(3) is None
    assert results_location_from({"merged_path": "file:///m.parquet"}) == "file:///m.parquet"
    assert results_location_from({}) is None
