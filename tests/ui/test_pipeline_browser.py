"""The Batches page over a REAL pipeline run: airflow standalone runs ``bulk_extraction`` against the
Message Batches emulator, then headless Chromium reads what the run left in the storage root.

Nothing is seeded by hand: the demo generator writes the day's tickets (including records that must
be refused), the scheduler creates the run, the real operators prepare, sample, submit, poll,
collect, resubmit and publish, and the page must show exactly the batches and money of the run's
``summary.json``, and its dead letters in the Airflow UI's DAG-run tab.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from anthropic_batch.ui.app import fmt_usd
from tests.ui.test_batches_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

DAG_ID = "bulk_extraction"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(airflow, storage root, run id, partition) after a scheduled bulk_extraction run succeeded."""
    from demo.generate_data import write_tickets
    from demo.standalone import StandaloneAirflow, poll_until

    from anthropic_batch.dag_factory import ensure_pool_commands
    from anthropic_batch.pipeline_config import load_pipelines
    from batches_emulator.testing import EmulatorProcess

    base = tmp_path_factory.mktemp("ui-pipeline")
    root = base / "storage"
    with EmulatorProcess("--processing-seconds", "1") as emulator:
        conn = {"conn_type": "anthropic", "password": emulator.api_key, "host": emulator.base_url}
        env = {
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(conn),
            "ANTHROPIC_BATCH_STORAGE_ROOT": root.as_uri(),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            # The emulator finishes a batch in about a second; poll it often.
            "ANTHROPIC_BATCH_POLL_INTERVAL": "5",
        }
        with StandaloneAirflow(base / "airflow", port=free_port(), env=env) as af:
            # The queue-budget pools (one per pipeline) the submit and resubmit tasks run in.
            for command in ensure_pool_commands(load_pipelines()):
                af.airflow_cli(*command)
            af.wait_for_dag(DAG_ID, timeout=240)
            # Unpausing creates the scheduled run of the last complete day (a data-interval
            # timetable, catchup off): yesterday's partition, which is the only data written.
            partition = (datetime.now(UTC) - timedelta(days=1)).date()
            write_tickets(root, partition, per_day=30)
            af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
            runs: list[dict] = []

            def scheduled() -> bool:
                runs[:] = af.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")["dag_runs"]
                return bool(runs)

            poll_until(scheduled, timeout=120, interval=2, message="the scheduler created no run")
            assert runs[0]["run_type"] == "scheduled", runs[0]
            assert runs[0]["data_interval_start"][:10] == partition.isoformat(), runs[0]
            run_id = runs[0]["dag_run_id"]
            state = af.wait_for_dag_run(DAG_ID, run_id, timeout=900)
            assert state == "success", f"{af.task_states(DAG_ID, run_id)}\n{af.log_tail()}"
            yield af, root, run_id, partition.isoformat()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser`")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_batches_page_and_dag_run_tab_show_the_real_run(finished_run, browser):
    af, root, run_id, partition = finished_run
    summaries = list(root.glob(f"*/extractions/date={partition}/_gen=*/summary.json"))  # the committed one
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["batch_ids"], summary
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    try:
        # Logged in with the token the simple auth manager issues (POST /auth/token), as its cookie.
        context.add_cookies([{"name": "_token", "value": af.token(), "url": af.base_url}])
        page = context.new_page()
        resp = page.goto(f"{af.base_url}/anthropic-batches/")
        assert resp is not None and resp.status == 200
        rows = page.locator("table.batches tbody tr")
        for batch_id in summary["batch_ids"]:
            if batch_id.startswith("msgbatch_"):
                assert rows.filter(has_text=batch_id).count() == 1, batch_id
        assert page.get_by_test_id("total-cost").inner_text() == fmt_usd(summary["cost_usd"])
        run_row = page.locator("table.runs tbody tr").filter(has_text=partition)
        assert run_row.locator(".badge").inner_text() == "published"
        page.screenshot(path=str(ARTIFACTS / "pipeline-batches.png"), full_page=True)

        # The DAG-run tab in the Airflow UI: the run's batches and its dead letters.
        page.goto(f"{af.base_url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/plugin/anthropic-batches-run")
        frame = page.frame_locator("iframe[title='Batches']")
        frame.get_by_test_id("run-cost").wait_for(timeout=60_000)
        assert frame.get_by_test_id("run-cost").inner_text() == fmt_usd(summary["cost_usd"])
        n_dead = summary["n_dead_letters"]
        assert frame.get_by_test_id("run-dead-letters").inner_text() == f"{n_dead:,}"
        assert frame.locator("table.dead-letters tbody tr").count() == min(n_dead, 200)
        if n_dead:
            assert re.search(r"prepare|collect", frame.locator("table.reasons").inner_text())
        page.screenshot(path=str(ARTIFACTS / "pipeline-dag-run-tab.png"))
    finally:
        context.close()
