"""The plugin as Airflow's plugin manager loads it, and what importing it costs every component."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from anthropic_batch.ui.charts import bar_chart, line_chart

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "plugins"), str(REPO_ROOT / "include")])
    return env


def test_airflow_plugin_manager_loads_every_part():
    proc = subprocess.run(
        [str(VENV_BIN / "airflow"), "plugins", "--output", "json"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plugins = json.loads(proc.stdout[proc.stdout.index("[") :])
    ours = next(p for p in plugins if p["name"] == "anthropic_batch")
    assert ours["source"].endswith("anthropic_batch_plugin.py")
    assert ours["fastapi_apps"] == [
        {
            "app": "fastapi.applications.FastAPI",
            "url_prefix": "/anthropic-batches",
            "name": "Anthropic batches",
        }
    ]
    views = {v["destination"]: v for v in ours["external_views"]}
    assert views["nav"]["href"] == "/anthropic-batches/" and views["nav"]["url_route"]
    assert views["dag_run"]["href"] == "/anthropic-batches/dag-runs/{DAG_ID}/{RUN_ID}"
    assert views["dag_run"]["url_route"] != views["nav"]["url_route"]
    assert ours["operator_extra_links"] == [
        "<anthropic_batch.links.AnthropicConsoleBatchLink object>",
        "<anthropic_batch.links.RunResultsLink object>",
    ]


def test_importing_the_plugin_stays_light():
    """Scheduler, triggerer and workers import the plugin: no pyarrow, pandas, SDK or API-server security."""
    code = (
        "import sys, airflow.plugins_manager\n"
        "import anthropic_batch_plugin\n"
        "heavy = ['pyarrow', 'pandas', 'anthropic', 'anthropic_batch.storage',"
        " 'airflow.api_fastapi.core_api.security']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_charts_escape_labels_and_handle_gaps():
    points = [
        {"date": "<b>x</b>", "cost_usd": 1.0, "sync_cost_usd": 2.0, "success_rate": 0.5},
        {"date": "2026-11-02", "cost_usd": 0.0, "sync_cost_usd": 0.0, "success_rate": None},
        {"date": "2026-11-03", "cost_usd": 3.0, "sync_cost_usd": 6.0, "success_rate": 1.0},
    ]
    bars = str(bar_chart(points, [("cost_usd", "cost", "bar-cost")], str, "t <i>"))
    assert "<b>" not in bars and "&lt;b&gt;" in bars and "t &lt;i&gt;" in bars
    assert bars.count('<rect class="bar-cost"') == 3
    line = str(line_chart(points, "success_rate", str, "rate"))
    assert line.count("<circle") == 2  # no dot where there is no value
    assert "No runs yet" in str(line_chart([], "success_rate", str, "rate"))
