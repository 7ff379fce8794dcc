"""The queue budget holds on a real ``airflow standalone`` (issue 9, item 5).

Two pipelines copied from ``bulk_extraction`` (chunks of 10 requests, ``queue_budget_requests`` 20
each, so pools of 2 slots) and a deployment-wide budget of 30 requests
(``ANTHROPIC_BATCH_QUEUE_BUDGET_REQUESTS``). Both are backfilled over three dates at once
(3 chunks per date, plus resubmit rounds: the emulator answers some requests with
``overloaded_error``). The emulator's batch list gives every batch's ``created_at``..``ended_at``
and request counts; the maximum overlap of in-progress requests must stay within 30 overall and
within 20 per pipeline, while more than one batch did run at a time. Chunks that wait for
admission wait in the triggerer (``AdmissionTrigger``), not by resuming workers.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import yaml
from demo.generate_data import write_tickets
from demo.standalone import StandaloneAirflow, poll_until

from anthropic_batch.pipeline_config import PIPELINES_DIR
from batches_emulator.testing import EmulatorProcess, free_port

pytestmark = pytest.mark.e2e

PIPELINES = ("qb_alpha", "qb_beta")
CHUNK = 10
PIPELINE_BUDGET = 20
DEPLOYMENT_BUDGET = 30
PER_DAY = 25  # 3 chunks per date: 10, 10, 5
DATES = [dt.date(2026, 10, 20) + dt.timedelta(days=i) for i in range(3)]
PROCESSING_SECONDS = 6
RUN_TIMEOUT = 900.0

DAG_FILE = '''
"""Queue budget test pipelines (an Airflow DAG file: the safe-mode scan looks for those words)."""
from pathlib import Path

from anthropic_batch.dag_factory import build_all
from anthropic_batch.pipeline_config import load_pipelines

globals().update(build_all(load_pipelines(Path(__file__).parent / "pipelines")))
'''


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(
        "--processing-seconds", str(PROCESSING_SECONDS), "--seed", "11",
        "--error-rate", "overloaded_error=0.1",
    ) as emu:  # fmt: skip
        yield emu


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("queue-budget-data")


@pytest.fixture(scope="module")
def dags_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("queue-budget-dags")
    (folder / "pipelines").mkdir()
    base = yaml.safe_load((PIPELINES_DIR / "bulk_extraction.yaml").read_text())
    for name in PIPELINES:
        config = {
            **base,
            "name": name,
            "sample": {**base["sample"], "size": 2},
            "resubmit": {**base["resubmit"], "max_attempts": 2},
            "max_requests_per_chunk": CHUNK,
            "queue_budget_requests": PIPELINE_BUDGET,
            "max_active_runs": 3,
        }
        (folder / "pipelines" / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (folder / "queue_budget_dags.py").write_text(DAG_FILE)
    return folder


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, emulator, storage_root, dags_folder) -> Iterator[StandaloneAirflow]:
    conn = {"conn_type": "anthropic", "password": emulator.api_key, "host": emulator.base_url}
    env = {
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(conn),
        "ANTHROPIC_BATCH_STORAGE_ROOT": f"file://{storage_root}",
        "ANTHROPIC_BATCH_QUEUE_BUDGET_REQUESTS": str(DEPLOYMENT_BUDGET),
        "ANTHROPIC_BATCH_POLL_INTERVAL": "1",
        # Admission checks in the triggerer: 1 s growing to 4 s (the default 5 s..60 s is for real batches).
        "ANTHROPIC_BATCH_ADMISSION_POLL_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # Enough parallelism that the budget, not the executor, is what limits the batches.
        "AIRFLOW__CORE__PARALLELISM": "32",
    }
    home = tmp_path_factory.mktemp("queue-budget-home")
    with StandaloneAirflow(home, port=free_port(), env=env, dags_folder=dags_folder) as af:
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines(dags_folder / "pipelines")):
            af.airflow_cli(*command)
        for dag_id in PIPELINES:
            af.wait_for_dag(dag_id, timeout=180)
            af.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        yield af


def _backfill_runs(af: StandaloneAirflow, dag_id: str) -> dict[str, str]:
    listing = af.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"run_type": "backfill"})
    return {(r.get("logical_date") or "")[:10]: r["dag_run_id"] for r in listing["dag_runs"]}


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def max_overlap(intervals: list[tuple[float, float, int]]) -> int:
    """The largest sum of ``n`` over intervals in progress at one instant (an end before a start
    at the same instant: the batch that ended no longer counts)."""
    events = sorted([(start, 1, n) for start, _, n in intervals] + [(end, 0, -n) for _, end, n in intervals])
    current = peak = 0
    for _, _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_max_overlap_helper():
    assert max_overlap([(0, 10, 5), (5, 15, 5), (10, 20, 5)]) == 10
    assert max_overlap([(0, 1, 3), (1, 2, 4)]) == 4


def _batch_pipelines(storage_root: Path) -> dict[str, str]:
    """batch id -> dag id, from the ledger entries (which record every batch created)."""
    found: dict[str, str] = {}
    for path in (storage_root / "_ledger").rglob("*.json"):
        if ".tmp-" in path.name:
            continue
        entry = json.loads(path.read_text())
        for batch_id in [entry.get("batch_id"), *(entry.get("previous_batch_ids") or [])]:
            if batch_id:
                found[batch_id] = entry["dag_id"]
    return found


def test_backfill_of_two_pipelines_stays_within_the_budgets(airflow, storage_root, emulator):
    root = airflow.env["ANTHROPIC_BATCH_STORAGE_ROOT"]
    for date in DATES:
        write_tickets(root, date, per_day=PER_DAY, seed=7)
    for dag_id in PIPELINES:
        airflow.create_backfill(dag_id, DATES[0], DATES[-1])
    wanted = {d.isoformat() for d in DATES}
    runs: dict[str, dict[str, str]] = {}

    def created() -> bool:
        for dag_id in PIPELINES:
            runs[dag_id] = {d: r for d, r in _backfill_runs(airflow, dag_id).items() if d in wanted}
        return all(set(r) == wanted for r in runs.values())

    poll_until(created, timeout=60, message=lambda: f"backfill runs not created: {runs}")

    def finished() -> bool:
        states = [airflow.dag_run(d, r)["state"] for d in PIPELINES for r in runs[d].values()]
        return all(s in ("success", "failed") for s in states)

    poll_until(finished, timeout=RUN_TIMEOUT, interval=3.0, message="the backfills did not finish")
    for dag_id in PIPELINES:
        for run_id in runs[dag_id].values():
            assert airflow.dag_run(dag_id, run_id)["state"] == "success", airflow.task_states(dag_id, run_id)

    client = anthropic.Anthropic(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=5)
    batches = list(client.messages.batches.list(limit=100))
    owner = _batch_pipelines(storage_root)
    intervals: dict[str, list[tuple[float, float, int]]] = {dag_id: [] for dag_id in PIPELINES}
    for batch in batches:
        assert batch.processing_status == "ended" and batch.ended_at is not None, batch
        counts = batch.request_counts
        n = counts.succeeded + counts.errored + counts.canceled + counts.expired + counts.processing
        intervals[owner[batch.id]].append((batch.created_at.timestamp(), batch.ended_at.timestamp(), n))
    every = [i for spans in intervals.values() for i in spans]
    peaks = {dag_id: max_overlap(spans) for dag_id, spans in intervals.items()}
    peak = max_overlap(every)
    print(f"{len(batches)} batches; peak in progress {peak} of {DEPLOYMENT_BUDGET}; per pipeline {peaks}")
    assert peak <= DEPLOYMENT_BUDGET
    assert all(p <= PIPELINE_BUDGET for p in peaks.values()), peaks
    assert peak > CHUNK  # batches did run side by side: the limit was what held them back
    # Resubmit rounds ran too (and were admitted like any chunk): more batches than chunks.
    assert len(every) > len(PIPELINES) * len(DATES) * 3
    # Every ticket ended released or dead: nothing is left holding the queue.
    from anthropic_batch.queue_budget import TicketQueue

    tickets = TicketQueue(storage_root).tickets()
    assert list(TicketQueue(storage_root).live_requests()) == []
    assert len(tickets) >= len(every)  # every batch was admitted (resubmit rounds included)
    tries = [
        ti.get("try_number") or 1
        for dag_id in PIPELINES
        for run_id in runs[dag_id].values()
        for ti in airflow.task_instances(dag_id, run_id)
        if ti["task_id"] == "batch.submit"
    ]
    chunks = {(t["owner"], t["ledger_path"]) for t in tickets}
    print(f"{len(tickets)} tickets for {len(chunks)} chunks; batch.submit tries: max {max(tries)}")
