"""What clear, deadline and Cancel do to a batch being waited for, on a real ``airflow standalone``
(scheduler, triggerer, api-server) and the emulator.

- Clearing a deferred wait re-attaches to the batch: the triggerer's ``on_kill`` must not cancel it.
- A sensor whose deadline passes cancels the batch, waits for the cancellation, succeeds, and the
  canceled requests are resubmitted (the run publishes every record).
- The Cancel action of the Batches page, served by the api-server, cancels through the connection in
  the metadata DB and records who did it.

Two pipelines copied from ``bulk_extraction`` run in a DAG folder of the test's own: ``ops_wait``
(as shipped) and ``ops_wait_deadline`` (its sensor gives up ``DEADLINE_SECONDS`` after the batch was
created; its resubmit keeps the pipeline's 30 h).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
import pytest
import yaml
from demo.generate_data import write_tickets
from demo.standalone import StandaloneAirflow, poll_until

from anthropic_batch.pipeline_config import PIPELINES_DIR
from batches_emulator.testing import EmulatorProcess, free_port

pytestmark = pytest.mark.e2e

DAG_ID = "ops_wait"
DEADLINE_DAG_ID = "ops_wait_deadline"
PER_DAY = 12  # one chunk
PROCESSING_SECONDS = 30  # long enough to clear or cancel a wait while its batch is in progress
DEADLINE_SECONDS = 12
RUN_TIMEOUT = 300.0

DAG_FILE = f'''
"""Test pipelines of {__name__} (an Airflow DAG file: the safe-mode scan looks for those words)."""
from pathlib import Path

from anthropic_batch.dag_factory import build_all
from anthropic_batch.pipeline_config import load_pipelines

dags = build_all(load_pipelines(Path(__file__).parent / "pipelines"))
# Only the sensor of this DAG gives up early; its resubmit keeps the pipeline's deadline.
dags["{DEADLINE_DAG_ID}"].task_dict["batch.submit"].deadline_hours = {DEADLINE_SECONDS} / 3600
globals().update(dags)
'''


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(
        "--processing-seconds", str(PROCESSING_SECONDS), "--cancel-seconds", "3", "--seed", "5"
    ) as emu:  # fmt: skip
        yield emu


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ops-wait-data")


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ops-wait-dags")
    (folder / "pipelines").mkdir()
    base = yaml.safe_load((PIPELINES_DIR / "bulk_extraction.yaml").read_text())
    for name in (DAG_ID, DEADLINE_DAG_ID):
        config = {**base, "name": name, "sample": {**base["sample"], "size": 2}}
        (folder / "pipelines" / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (folder / "ops_wait_dags.py").write_text(DAG_FILE)
    return folder


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, emulator, storage_root, dags_folder) -> Iterator[StandaloneAirflow]:
    env = {
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT": None,  # the connection lives in the metadata DB (below)
        "ANTHROPIC_BATCH_STORAGE_ROOT": f"file://{storage_root}",
        "ANTHROPIC_BATCH_POLL_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    }
    home = tmp_path_factory.mktemp("ops-wait-home")
    with StandaloneAirflow(home, port=free_port(), env=env, dags_folder=dags_folder) as af:
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines(dags_folder / "pipelines")):
            af.airflow_cli(*command)
        af.api(
            "POST",
            "/api/v2/connections",
            json={
                "connection_id": "anthropic_default",
                "conn_type": "anthropic",
                "host": emulator.base_url,
                "password": emulator.api_key,
            },
        )
        for dag_id in (DAG_ID, DEADLINE_DAG_ID):
            af.wait_for_dag(dag_id, timeout=180)
            af.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        yield af


@pytest.fixture(scope="module")
def client(emulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=5)


# -- helpers -----------------------------------------------------------------------------------------
def _trigger(af: StandaloneAirflow, dag_id: str, date: dt.date) -> str:
    # The data for the run's date and the day before: whichever partition the timetable reads.
    for day in (date, date - dt.timedelta(days=1)):
        write_tickets(af.env["ANTHROPIC_BATCH_STORAGE_ROOT"], day, per_day=PER_DAY, seed=7)
    body = {
        "dag_run_id": f"e2e__{date.isoformat()}",
        "logical_date": f"{date.isoformat()}T00:00:00Z",
        "conf": {"mode": "batch"},
    }
    return af.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]


def _wait_ti(af: StandaloneAirflow, dag_id: str, run_id: str, task_id: str) -> dict:
    for ti in af.task_instances(dag_id, run_id):
        if ti["task_id"] == task_id:
            return ti
    raise AssertionError(f"no {task_id} in {af.task_states(dag_id, run_id)}")


def _until_deferred(af: StandaloneAirflow, dag_id: str, run_id: str, *, try_number: int = 1) -> dict:
    found: dict = {}

    def deferred() -> bool:
        states = af.task_states(dag_id, run_id)
        if any(v in ("failed", "upstream_failed") for v in states.values()):
            raise AssertionError(f"run failed: {states}\n{af.log_tail(3000)}")
        tis = [t for t in af.task_instances(dag_id, run_id) if t["task_id"] == "batch.submit"]
        if tis and tis[0]["state"] == "deferred" and tis[0]["try_number"] >= try_number:
            found.update(tis[0])
            return True
        return False

    poll_until(deferred, timeout=RUN_TIMEOUT, interval=0.5, message="the sensor never deferred")
    return found


def _ledger_entries(storage_root: Path, dag_id: str, date: dt.date, task_id: str) -> list[dict]:
    folder = storage_root / "_ledger" / dag_id / date.isoformat() / task_id
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if ".tmp" not in p.name]


def _run_ended(af: StandaloneAirflow, dag_id: str, run_id: str) -> str:
    return af.wait_for_dag_run(dag_id, run_id, timeout=RUN_TIMEOUT)


def _published(storage_root: Path, dag_id: str, date: dt.date) -> tuple[dict, list[dict]]:
    from anthropic_batch.partition import published_dir

    partition = Path(published_dir(storage_root / dag_id / "extractions" / f"date={date.isoformat()}").path)
    summary = json.loads((partition / "summary.json").read_text())
    rows = pq.read_table(partition / "data.parquet", columns=["custom_id", "status", "batch_id"]).to_pylist()
    return summary, rows


# -- the tests ---------------------------------------------------------------------------------------
def test_clearing_a_deferred_wait_reattaches_and_cancels_nothing(airflow, storage_root, client):
    date = dt.date(2026, 11, 3)
    run_id = _trigger(airflow, DAG_ID, date)
    _until_deferred(airflow, DAG_ID, run_id)
    (entry,) = _ledger_entries(storage_root, DAG_ID, date, "batch.submit")
    batch_id = entry["batch_id"]
    assert client.messages.batches.retrieve(batch_id).processing_status == "in_progress"

    airflow.api(
        "POST",
        f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
        json={"dry_run": False, "dag_run_id": run_id, "task_ids": ["batch.submit"], "only_failed": False},
    )
    # The cleared wait runs again and defers on the same batch (its trigger was removed by the clear).
    _until_deferred(airflow, DAG_ID, run_id, try_number=2)
    assert _run_ended(airflow, DAG_ID, run_id) == "success", airflow.task_states(DAG_ID, run_id)

    batch = client.messages.batches.retrieve(batch_id)
    assert batch.cancel_initiated_at is None, "clearing the wait canceled the batch"
    assert batch.request_counts.canceled == 0 and batch.request_counts.succeeded > 0
    summary, rows = _published(storage_root, DAG_ID, date)
    assert summary["batch_ids"] == [batch_id]  # re-attached: nothing submitted again
    assert summary["attempts"] == 1
    assert {r["status"] for r in rows} == {"succeeded"}


def test_deadline_cancels_waits_and_resubmits_the_canceled_requests(airflow, storage_root, client):
    date = dt.date(2026, 11, 5)
    run_id = _trigger(airflow, DEADLINE_DAG_ID, date)
    assert _run_ended(airflow, DEADLINE_DAG_ID, run_id) == "success", (
        f"{airflow.task_states(DEADLINE_DAG_ID, run_id)}\n{airflow.log_tail(4000)}"
    )
    wait = _wait_ti(airflow, DEADLINE_DAG_ID, run_id, "batch.submit")
    assert wait["state"] == "success" and wait["try_number"] == 1  # no failed try, no retry needed

    (entry,) = _ledger_entries(storage_root, DEADLINE_DAG_ID, date, "batch.submit")
    assert entry["cancel_reason"] == "deadline" and entry["canceled_by"] is None
    first = client.messages.batches.retrieve(entry["batch_id"])
    assert first.cancel_initiated_at is not None and first.processing_status == "ended"
    assert first.request_counts.canceled > 0

    summary, rows = _published(storage_root, DEADLINE_DAG_ID, date)
    assert summary["attempts"] >= 2, summary  # the canceled requests went to resubmit
    assert len(summary["batch_ids"]) >= 2 and entry["batch_id"] in summary["batch_ids"]
    assert {r["status"] for r in rows} == {"succeeded"}, rows


def test_cancel_on_the_batches_page_records_the_user(airflow, storage_root, client):
    date = dt.date(2026, 11, 7)
    run_id = _trigger(airflow, DAG_ID, date)
    _until_deferred(airflow, DAG_ID, run_id)
    (entry,) = _ledger_entries(storage_root, DAG_ID, date, "batch.submit")
    batch_id = entry["batch_id"]

    answer = airflow.api(
        "POST", f"/anthropic-batches/api/runs/{DAG_ID}/{date.isoformat()}/batches/{batch_id}/cancel"
    )
    assert answer["canceled_by"] == airflow.username and answer["cancel_reason"] == "user"
    assert client.messages.batches.retrieve(batch_id).cancel_initiated_at is not None
    (entry,) = _ledger_entries(storage_root, DAG_ID, date, "batch.submit")
    assert entry["canceled_by"] == airflow.username and entry["cancel_requested_at"]

    # The wait sees the batch end and succeeds; collect gets what the batch holds.
    def waited() -> bool:
        return _wait_ti(airflow, DAG_ID, run_id, "batch.submit")["state"] in ("success", "failed")

    poll_until(waited, timeout=RUN_TIMEOUT, interval=1.0, message="the wait never finished")
    assert _wait_ti(airflow, DAG_ID, run_id, "batch.submit")["state"] == "success"
    # What resubmit does with the canceled requests is its policy (dead-lettered: "canceled by <user>").
