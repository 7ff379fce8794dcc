"""THE PROOF: the Batches page in a real ``airflow standalone``, opened by real headless Chromium.

A user logs in through Airflow's own login page, opens the Batches page (directly and inside the
Airflow UI's navigation iframe), reads the batch rows, costs and charts, and drills into a run with
its dead letters. An unauthenticated browser is refused. Screenshots go to ``test-artifacts/ui/``
(git-ignored).

Data: the storage root is filled by ``tests/ui/seed.py`` with the project's own writers (ledger,
atomic JSON, Parquet with the dead-letter schema), so every number on the page is known exactly.
``test_pipeline_browser.py`` does the same over the artefacts of a real pipeline run.

The plugins folder is the project's. The DAGs folder holds one stand-in DAG with the seeded dag id,
kept paused: it exists only so Airflow has a DagRun to show the DAG-run tab for, and so this test
does not depend on the pipeline DAGs importing.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.ui.seed import DAG_ID, XSS, run_id_of, seed

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_DAY = "2026-11-21"
RUN_ID = run_id_of(RUN_DAY)
STAND_IN_DAG = f'''
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("{DAG_ID}", schedule=None):
    EmptyOperator(task_id="noop")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """A real standalone Airflow whose storage root is seeded with three days of batches."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    from demo.standalone import StandaloneAirflow

    base = tmp_path_factory.mktemp("ui-e2e")
    root = base / "storage"
    root.mkdir()
    seed(str(root))
    # DAGs stay paused: nothing but this test may write to the storage root.
    env = {
        "ANTHROPIC_BATCH_STORAGE_ROOT": root.as_uri(),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    }
    dags = base / "dags"
    dags.mkdir()
    (dags / "stand_in.py").write_text(STAND_IN_DAG)
    with StandaloneAirflow(base / "airflow", port=free_port(), env=env, dags_folder=dags) as af:
        yield af


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_plugin_is_registered_and_the_api_requires_a_token(airflow):
    plugins = airflow.api("GET", "/api/v2/plugins")["plugins"]
    ours = next(p for p in plugins if p["name"] == "anthropic_batch")
    assert {v["destination"] for v in ours["external_views"]} == {"nav", "dag_run"}
    assert ours["fastapi_apps"][0]["url_prefix"] == "/anthropic-batches"
    assert len(ours["operator_extra_links"]) == 2
    url = f"{airflow.base_url}/anthropic-batches/api/batches"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    resp = httpx.get(url, headers={"Authorization": f"Bearer {airflow.token()}"})
    assert resp.status_code == 200
    assert len(resp.json()["batches"]) == 4


def test_unauthenticated_browser_is_refused(airflow, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        resp = page.goto(f"{airflow.base_url}/anthropic-batches/")
        assert resp is not None and resp.status == 401
        assert page.get_by_role("heading", name="Log in to Airflow").is_visible()
        assert page.locator("text=msgbatch_").count() == 0
        resp = page.goto(f"{airflow.base_url}/anthropic-batches/runs/{DAG_ID}/{RUN_DAY}")
        assert resp is not None and resp.status == 401
        assert page.locator("text=doc-17").count() == 0
    finally:
        context.close()


def test_user_logs_in_and_reads_batches_costs_and_dead_letters(airflow, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    try:
        page = context.new_page()
        # Refused first; the error page's link leads to Airflow's real login page and back.
        page.goto(f"{airflow.base_url}/anthropic-batches/")
        page.get_by_role("link", name="Log in to Airflow").click()
        page.get_by_label("Username").fill(airflow.username)
        page.get_by_label("Password").fill(airflow.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r".*/anthropic-batches/$"), timeout=30_000)
        assert any(c["name"] == "_token" for c in context.cookies())

        # The Batches page: every batch, with its status, counts, costs, and the charts.
        page.get_by_role("heading", name="Batches", exact=True).wait_for()
        rows = page.locator("table.batches tbody tr")
        assert rows.count() == 4
        running = rows.filter(has_text="msgbatch_04DDDD")
        assert running.locator(".badge").inner_text() == "in progress"
        assert re.search(r"expires in 2[01]h \d\dm", running.inner_text())
        assert "processing 80" in running.inner_text()
        partial = rows.filter(has_text="msgbatch_02BBBB")
        assert partial.locator(".badge").inner_text() == "ended"
        assert "errored 3" in partial.inner_text() and "expired 2" in partial.inner_text()
        assert "$0.0480" in partial.inner_text() and "$0.0960" in partial.inner_text()
        assert page.get_by_test_id("total-cost").inner_text() == "$0.1000"
        assert page.get_by_test_id("total-savings").inner_text() == "$0.1000"
        assert page.locator("svg.chart").count() == 3
        assert page.locator("svg.chart rect.bar-cost").count() == 3
        assert page.locator("table.runs tbody tr").count() == 3
        page.screenshot(path=str(ARTIFACTS / "batches.png"), full_page=True)

        # Drill into a run: failures by reason and the dead letters, model output shown as text.
        page.get_by_role("link", name=RUN_DAY).first.click()
        page.wait_for_url(re.compile(rf".*/runs/{DAG_ID}/{RUN_DAY}$"))
        dead = page.locator("table.dead-letters tbody tr")
        assert dead.count() == 3
        assert XSS in dead.filter(has_text="doc-17").inner_text()  # visible as text, not executed
        assert page.locator("script").count() == 0
        assert "prompt is too long" in page.locator("table.reasons").inner_text()
        assert page.get_by_test_id("run-dead-letters").inner_text() == "3"
        assert page.locator("table.batches tbody tr").count() == 2
        page.screenshot(path=str(ARTIFACTS / "run.png"), full_page=True)

        # Inside the Airflow UI: the "Batches" navigation entry shows the page in its iframe.
        page.goto(f"{airflow.base_url}/plugin/anthropic-batches")
        frame = page.frame_locator("iframe[title='Batches']")
        frame.locator("table.batches").wait_for(timeout=60_000)
        assert frame.locator("table.batches tbody tr").count() == 4
        page.screenshot(path=str(ARTIFACTS / "airflow-nav.png"))
    finally:
        context.close()


def test_dag_run_tab_shows_the_runs_batches_and_dead_letters(airflow, browser):
    """The dag_run destination view: Airflow's UI fills {DAG_ID}/{RUN_ID} and frames our page."""
    airflow.wait_for_dag(DAG_ID, timeout=180)
    airflow.api(
        "POST",
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        json={"dag_run_id": RUN_ID, "logical_date": f"{RUN_DAY}T00:00:00Z"},
    )
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    try:
        # Logged in with the token the simple auth manager issues (POST /auth/token), as its cookie.
        context.add_cookies([{"name": "_token", "value": airflow.token(), "url": airflow.base_url}])
        page = context.new_page()
        page.goto(
            f"{airflow.base_url}/dags/{DAG_ID}/runs/{quote(RUN_ID, safe='')}/plugin/anthropic-batches-run"
        )
        frame = page.frame_locator("iframe[title='Batches']")
        frame.locator("table.dead-letters").wait_for(timeout=60_000)
        assert frame.locator("table.dead-letters tbody tr").count() == 3
        assert frame.locator("table.batches tbody tr").count() == 2
        assert frame.get_by_test_id("run-cost").inner_text() == "$0.0500"
        page.screenshot(path=str(ARTIFACTS / "dag-run-tab.png"))
        # Links inside the (sandboxed) frame keep the login: back to the overview.
        frame.get_by_role("link", name="All batches").click()
        frame.locator("table.runs").wait_for()
        assert frame.locator("table.batches tbody tr").count() == 4
    finally:
        context.close()


def test_json_api_agrees_with_the_page(airflow):
    headers = {"Authorization": f"Bearer {airflow.token()}"}
    body = httpx.get(
        f"{airflow.base_url}/anthropic-batches/api/runs/{DAG_ID}/{RUN_DAY}", headers=headers
    ).json()
    assert body["dead_letters"]["total"] == 3
    assert json.dumps(body).count("msgbatch_") >= 2
