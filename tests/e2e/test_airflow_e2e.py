"""End to end on a real ``airflow standalone`` and the emulator: REST trigger, backfill, a killed
triggerer, a cleared submit task. One standalone instance for the module; small data.

Batches are counted through the official SDK's ``messages.batches.list`` against the emulator: the
money rule is that no chunk is ever submitted twice, whatever happens to Airflow in between.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
import pytest
from demo.generate_data import valid_ticket_ids, write_tickets
from demo.standalone import StandaloneAirflow, poll_until

from batches_emulator.testing import EmulatorProcess, free_port

pytestmark = pytest.mark.e2e

DAG_ID = "bulk_extraction"
PER_DAY = 12  # one chunk (chunks hold 25)
# Long enough that the test can kill the triggerer while a batch is still in progress.
PROCESSING_SECONDS = "10"
RUN_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess("--processing-seconds", PROCESSING_SECONDS, "--seed", "3") as emu:
        yield emu


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-data")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, emulator, storage_root) -> Iterator[StandaloneAirflow]:
    env = {
        # The connection lives in the metadata DB (created below) so a test can repoint it.
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT": None,
        "ANTHROPIC_BATCH_STORAGE_ROOT": f"file://{storage_root}",
        "ANTHROPIC_BATCH_POLL_INTERVAL": "1",
        # Only the runs the tests create: no periodic or asset-triggered runs.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # A replacement triggerer picks up orphaned triggers after this many seconds.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
    }
    home = tmp_path_factory.mktemp("airflow-home")
    with StandaloneAirflow(home, port=free_port(), env=env) as af:
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines()):
            af.airflow_cli(*command)
        af.api("POST", "/api/v2/connections", json=_connection(emulator))
        af.wait_for_dag(DAG_ID, timeout=180)
        af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        yield af


def _connection(emu: EmulatorProcess) -> dict:
    return {
        "connection_id": "anthropic_default",
        "conn_type": "anthropic",
        "host": emu.base_url,
        "password": emu.api_key,
    }


@pytest.fixture(scope="module")
def batches_client(emulator) -> anthropic.Anthropic:
    return _client(emulator)


def _client(emu: EmulatorProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url, max_retries=5)


def _batch_ids(client: anthropic.Anthropic) -> set[str]:
    return {b.id for b in client.messages.batches.list(limit=100)}


def _partition(storage_root: Path, date: dt.date) -> Path:
    """The published partition's committed generation directory (read through its commit file)."""
    from anthropic_batch.partition import published_dir

    return Path(published_dir(f"file://{storage_root}/{DAG_ID}/extractions/date={date.isoformat()}").path)


def _n_chunks(storage_root: Path, date: dt.date) -> int:
    manifest = storage_root / DAG_ID / "work" / f"date={date.isoformat()}" / "requests" / "manifest.json"
    return len(json.loads(manifest.read_text())["chunks"])


def _assert_published(storage_root: Path, date: dt.date) -> dict:
    partition = _partition(storage_root, date)
    rows = pq.read_table(partition / "data.parquet", columns=["ticket_id", "status"]).to_pylist()
    assert sorted(r["ticket_id"] for r in rows) == sorted(valid_ticket_ids(date, PER_DAY, seed=7))
    summary = json.loads((partition / "summary.json").read_text())
    assert summary["n_rows"] == len(rows)
    return summary


def _trigger(af: StandaloneAirflow, date: dt.date) -> str:
    write_tickets(af.env["ANTHROPIC_BATCH_STORAGE_ROOT"], date, per_day=PER_DAY, seed=7)
    body = {
        "dag_run_id": f"e2e__{date.isoformat()}",
        "logical_date": f"{date.isoformat()}T00:00:00Z",
        "conf": {"mode": "batch"},
    }
    return af.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", json=body)["dag_run_id"]


def _wait_success(af: StandaloneAirflow, run_id: str) -> None:
    state = af.wait_for_dag_run(DAG_ID, run_id, timeout=RUN_TIMEOUT)
    assert state == "success", f"{run_id}: {af.task_states(DAG_ID, run_id)}\n{af.log_tail(3000)}"


def test_rest_trigger_runs_to_success(airflow, storage_root, batches_client):
    date = dt.date(2026, 10, 10)
    before = _batch_ids(batches_client)
    run_id = _trigger(airflow, date)
    _wait_success(airflow, run_id)
    summary = _assert_published(storage_root, date)
    new = _batch_ids(batches_client) - before
    assert new == set(summary["batch_ids"])
    assert len(new) == _n_chunks(storage_root, date)


def test_clearing_a_finished_submit_creates_no_second_batch(airflow, storage_root, batches_client):
    date = dt.date(2026, 10, 10)  # the run of the previous test
    run_id = f"e2e__{date.isoformat()}"
    if airflow.dag_run(DAG_ID, run_id)["state"] != "success":
        pytest.skip("needs the successful run of test_rest_trigger_runs_to_success")
    before = _batch_ids(batches_client)
    airflow.api(
        "POST",
        f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
        json={
            "dry_run": False,
            "dag_run_id": run_id,
            "task_ids": ["batch.submit"],
            "include_downstream": True,
            "only_failed": False,
            "reset_dag_runs": True,
        },
    )
    poll_until(
        lambda: airflow.dag_run(DAG_ID, run_id)["state"] != "success",
        timeout=30,
        message="the cleared run never left success",
    )
    _wait_success(airflow, run_id)
    assert _batch_ids(batches_client) == before  # the ledger found the earlier submission
    _assert_published(storage_root, date)


def test_backfill_three_dates_one_batch_per_chunk(airflow, storage_root, batches_client):
    dates = [dt.date(2026, 10, 20) + dt.timedelta(days=i) for i in range(3)]
    root = airflow.env["ANTHROPIC_BATCH_STORAGE_ROOT"]
    for date in dates:
        write_tickets(root, date, per_day=PER_DAY, seed=7)
    before = _batch_ids(batches_client)
    airflow.create_backfill(DAG_ID, dates[0], dates[-1])
    wanted = {d.isoformat() for d in dates}
    runs: dict[str, str] = {}

    def created() -> bool:
        listing = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"})
        for run in listing["dag_runs"]:
            day = (run.get("logical_date") or "")[:10]
            if day in wanted:
                runs[day] = run["dag_run_id"]
        return set(runs) == wanted

    poll_until(created, timeout=60, message=lambda: f"backfill runs not created: {runs}")
    backfills = airflow.api("GET", "/api/v2/backfills", params={"dag_id": DAG_ID})["backfills"]
    assert len(backfills) == 1, backfills  # a retried, locked `backfill create` left nothing behind
    for day in sorted(runs):
        _wait_success(airflow, runs[day])
    new = _batch_ids(batches_client) - before
    published_batches: set[str] = set()
    for date in dates:
        summary = _assert_published(storage_root, date)
        assert len(summary["batch_ids"]) == _n_chunks(storage_root, date)
        published_batches |= set(summary["batch_ids"])
    assert new == published_batches
    assert len(new) == sum(_n_chunks(storage_root, d) for d in dates)


def test_run_survives_a_killed_triggerer(airflow, storage_root, batches_client):
    date = dt.date(2026, 10, 12)
    before = _batch_ids(batches_client)
    run_id = _trigger(airflow, date)

    def deferred() -> bool:
        states = airflow.task_states(DAG_ID, run_id)
        if any(v in ("failed", "upstream_failed") for v in states.values()):
            raise AssertionError(f"run failed before deferral: {states}")
        return any(k.startswith("batch.submit") and v == "deferred" for k, v in states.items())

    poll_until(deferred, timeout=RUN_TIMEOUT, interval=0.5, message="the sensor never deferred")
    killed = airflow.kill_component("triggerer", signal.SIGKILL)
    assert killed, "no triggerer process found"
    poll_until(lambda: not airflow.pids_of("triggerer"), timeout=15, message="triggerer still alive")
    # The batch is still in progress at the emulator (processing takes PROCESSING_SECONDS).
    pending = _batch_ids(batches_client) - before
    statuses = {b: batches_client.messages.batches.retrieve(b).processing_status for b in pending}
    assert "in_progress" in statuses.values(), statuses
    assert airflow.dag_run(DAG_ID, run_id)["state"] == "running"
    airflow.start_component("triggerer")
    _wait_success(airflow, run_id)
    summary = _assert_published(storage_root, date)
    new = _batch_ids(batches_client) - before
    assert new == set(summary["batch_ids"])
    assert len(new) == _n_chunks(storage_root, date)


def test_retriable_failures_are_resubmitted_through_the_real_triggerer(airflow, storage_root, emulator):
    # The resubmit loop defers between rounds: a real triggerer must resume it from its stored state.
    date = dt.date(2026, 10, 14)
    with EmulatorProcess(
        "--processing-seconds", "2", "--seed", "11", "--error-rate", "overloaded_error=0.3"
    ) as faulty:  # fmt: skip
        airflow.api("PATCH", "/api/v2/connections/anthropic_default", json=_connection(faulty))
        try:
            run_id = _trigger(airflow, date)
            _wait_success(airflow, run_id)
            summary = _assert_published(storage_root, date)
            created = _batch_ids(_client(faulty))
        finally:
            airflow.api("PATCH", "/api/v2/connections/anthropic_default", json=_connection(emulator))
    assert summary["attempts"] >= 2, summary  # a resubmit round ran, and came back through the trigger
    assert created == set(summary["batch_ids"])
    # One batch per chunk for attempt 1, then one per retry round (a handful of requests each).
    assert len(created) == _n_chunks(storage_root, date) + summary["attempts"] - 1
    assert sum(summary["counts_by_status"].values()) == summary["n_rows"]
