"""The scheduler's own runs on a real ``airflow standalone`` and the emulator: which partition a
scheduled run and a backfill process, and that every published date gets its overnight report.

Data exists only for the day that just ended and for two backfill dates, never for today: a
scheduled run that read today's (barely started) partition would fail on a missing file. The
report DAG is unpaused before anything is published, so the Asset events of the scheduled run and
of the backfill arrive while a report run is queued or running and Airflow collapses them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo.generate_data import write_tickets
from demo.standalone import StandaloneAirflow, poll_until

from batches_emulator.testing import EmulatorProcess, free_port

pytestmark = pytest.mark.e2e

DAG_ID = "bulk_extraction"
REPORT_DAG_ID = "overnight_report"
PER_DAY = 10
BACKFILL = [dt.date(2026, 10, 20), dt.date(2026, 10, 21)]
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[tuple[StandaloneAirflow, Path, dt.date]]:
    root = tmp_path_factory.mktemp("schedule-data")
    # The day that just ended (UTC), computed here, independently of Airflow.
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    for date in [yesterday, *BACKFILL]:
        write_tickets(root, date, per_day=PER_DAY, seed=11)
    with EmulatorProcess("--processing-seconds", "1", "--seed", "5") as emulator:
        env = {
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(
                {"conn_type": "anthropic", "password": emulator.api_key, "host": emulator.base_url}
            ),
            "ANTHROPIC_BATCH_STORAGE_ROOT": root.as_uri(),
            "ANTHROPIC_BATCH_POLL_INTERVAL": "1",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        }
        home = tmp_path_factory.mktemp("schedule-airflow")
        with StandaloneAirflow(home, port=free_port(), env=env) as af:
            from anthropic_batch.dag_factory import ensure_pool_commands
            from anthropic_batch.pipeline_config import load_pipelines

            for command in ensure_pool_commands(load_pipelines()):  # one pool per pipeline
                af.airflow_cli(*command)
            af.wait_for_dag(DAG_ID, timeout=240)
            af.wait_for_dag(REPORT_DAG_ID, timeout=120)
            assert af.import_errors() == []
            af.api("PATCH", f"/api/v2/dags/{REPORT_DAG_ID}", json={"is_paused": False})
            af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
            yield af, root, yesterday


def _runs(af: StandaloneAirflow, dag_id: str, run_type: str) -> list[dict]:
    return af.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": run_type})["dag_runs"]


def _wait_success(af: StandaloneAirflow, dag_id: str, run_id: str) -> None:
    state = af.wait_for_dag_run(dag_id, run_id, timeout=RUN_TIMEOUT)
    assert state == "success", f"{run_id}: {af.task_states(dag_id, run_id)}\n{af.log_tail(3000)}"


def test_scheduled_run_processes_the_day_that_ended_and_a_backfill_its_dates(setup):
    af, root, yesterday = setup
    scheduled: list[dict] = []

    def created() -> bool:
        scheduled[:] = _runs(af, DAG_ID, "scheduled")
        return bool(scheduled)

    poll_until(created, timeout=120, interval=2, message="the scheduler created no run")
    (run,) = scheduled
    # The scheduler's run for yesterday: its data interval is yesterday, due once yesterday ended.
    assert run["data_interval_start"][:10] == yesterday.isoformat(), run
    assert run["data_interval_end"][:10] == (yesterday + dt.timedelta(days=1)).isoformat(), run
    af.create_backfill(DAG_ID, BACKFILL[0], BACKFILL[-1])
    _wait_success(af, DAG_ID, run["dag_run_id"])
    assert (root / DAG_ID / "extractions" / f"date={yesterday}" / "_SUCCESS").exists()

    backfills: dict[str, str] = {}

    def backfill_runs() -> bool:
        for b in _runs(af, DAG_ID, "backfill"):
            backfills[b["logical_date"][:10]] = b["dag_run_id"]
        return set(backfills) == {d.isoformat() for d in BACKFILL}

    poll_until(backfill_runs, timeout=60, interval=2, message=lambda: f"backfill runs: {backfills}")
    for date in BACKFILL:
        _wait_success(af, DAG_ID, backfills[date.isoformat()])
        assert (root / DAG_ID / "extractions" / f"date={date}" / "_SUCCESS").exists()
    today = dt.datetime.now(dt.UTC).date()
    assert not (root / DAG_ID / "work" / f"date={today}").exists()  # nothing ever read today


def test_every_published_date_gets_its_report(setup):
    af, root, yesterday = setup
    wanted = [*BACKFILL, yesterday]
    # Published by the previous test (or published now, if it is run alone: wait for it).
    for date in wanted:
        poll_until(
            lambda date=date: (root / DAG_ID / "extractions" / f"date={date}" / "_SUCCESS").exists(),
            timeout=RUN_TIMEOUT,
            interval=2,
            message=lambda date=date: f"{date} never published: {af.log_tail(2000)}",
        )

    def reported() -> bool:
        return all((root / "reports" / f"date={d}" / "report.html").exists() for d in wanted)

    def status() -> str:
        runs = _runs(af, REPORT_DAG_ID, "asset_triggered") + _runs(af, REPORT_DAG_ID, "scheduled")
        states = {r["dag_run_id"]: af.task_states(REPORT_DAG_ID, r["dag_run_id"]) for r in runs}
        present = sorted(p.parent.name for p in root.glob("reports/*/report.html"))
        return f"reports {present}; report runs {states}"

    poll_until(reported, timeout=RUN_TIMEOUT, interval=3, message=status)
    for date in wanted:
        report = json.loads((root / "reports" / f"date={date}" / "report.json").read_text())
        assert report["date"] == date.isoformat() and report["groups"], report
    # However Airflow grouped the Asset events into report runs, none was left without its report.
    assert _runs(af, REPORT_DAG_ID, "asset_triggered"), status()
