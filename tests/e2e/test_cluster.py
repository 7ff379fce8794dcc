"""End to end on a distributed Airflow (``demo.cluster``): Postgres, Redis, Celery with two workers in
different working directories, S3 (moto) as the storage root, the emulator as the API.

One scenario: a 3-date backfill of ``bulk_extraction`` (``max_active_runs: 3``) plus a manual run of
one of those dates at the same time; one Celery worker is SIGKILLed while a collect runs on it.
Then: both workers ran tasks; exactly one batch per chunk at the emulator (listed with the SDK);
every partition published, complete, on S3; nothing written under the checkout's ``data/``; the
Batches page lists the runs from S3. Run alone with ``pytest -m cluster``.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
import pytest
from demo.cluster import AWS_CONN_ID, Cluster, upload_demo_tickets
from demo.generate_data import valid_ticket_ids
from demo.standalone import REPO_ROOT, poll_until

from batches_emulator.testing import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

DAG_ID = "bulk_extraction"
PER_DAY = 12  # one chunk per date (chunks hold 25)
DATES = [dt.date(2026, 9, 21) + dt.timedelta(days=i) for i in range(3)]
MANUAL_DATE = DATES[1]
RUN_TIMEOUT = 600.0
FAILED = ("failed", "upstream_failed")


def _tree(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    # Postgres runs as the postgres user when we are root: its directory must be reachable by it
    # (pytest's base temp directory is private to root).
    pg_parent = Path(tempfile.mkdtemp(prefix="cluster-e2e-pg-"))
    pg_parent.chmod(0o755)
    env = {
        "ANTHROPIC_BATCH_POLL_INTERVAL": "1",
        # Only the runs the test creates.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # A task whose worker died is noticed within seconds, then retried (on the other worker).
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    }
    saved = {k: os.environ.get(k) for k in ("AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_ANTHROPIC_DEFAULT")}
    home = tmp_path_factory.mktemp("cluster-home")
    started = time.monotonic()
    with Cluster(
        home,
        api_port=free_port(),
        storage_prefix="e2e",
        emulator_flags=("--processing-seconds", "6", "--seed", "3"),
        postgres_dir=pg_parent / "data",
        env=env,
    ) as af:
        print(f"\ncluster up in {time.monotonic() - started:.0f}s")
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines()):  # one pool per pipeline
            af.airflow_cli(*command)
        af.wait_for_dag(DAG_ID, timeout=240)
        af.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        try:
            yield af
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    shutil.rmtree(pg_parent, ignore_errors=True)


def _read(cluster: Cluster, key: str) -> bytes:
    from anthropic_batch import storage

    with storage.open_binary(f"{cluster.storage_root}/{key}") as handle:
        return handle.read()


def _worker_of(ti: dict) -> str | None:
    hostname = ti.get("hostname") or ""
    return hostname.rsplit("/", 1)[-1] if "/" in hostname else None


def test_backfill_and_manual_run_on_celery_and_s3_survive_a_killed_worker(cluster):
    started = time.monotonic()
    data_before = _tree(REPO_ROOT / "data")
    for date in DATES:
        upload_demo_tickets(cluster, date, PER_DAY)
    client = anthropic.Anthropic(api_key=cluster.emulator.api_key, base_url=cluster.emulator.base_url)
    assert not list(client.messages.batches.list(limit=100))

    cluster.api(
        "POST",
        "/api/v2/backfills",
        json={
            "dag_id": DAG_ID,
            "from_date": f"{DATES[0].isoformat()}T00:00:00Z",
            "to_date": f"{DATES[-1].isoformat()}T00:00:00Z",
            "max_active_runs": 3,
            "run_backwards": False,
            "dag_run_conf": {"mode": "batch"},
            "reprocess_behavior": "none",
        },
    )
    # The same date by hand, at the same time: another logical time, the same data interval.
    manual = cluster.api(
        "POST",
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        json={
            "dag_run_id": f"manual__{MANUAL_DATE.isoformat()}",
            "logical_date": f"{MANUAL_DATE.isoformat()}T12:00:00Z",
            "data_interval_start": f"{MANUAL_DATE.isoformat()}T00:00:00Z",
            "data_interval_end": f"{(MANUAL_DATE + dt.timedelta(days=1)).isoformat()}T00:00:00Z",
            "conf": {"mode": "batch"},
        },
    )
    runs: dict[str, str] = {manual["dag_run_id"]: MANUAL_DATE.isoformat()}

    def backfill_runs_created() -> bool:
        listing = cluster.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"})
        for run in listing["dag_runs"]:
            runs[run["dag_run_id"]] = run["logical_date"][:10]
        return len(runs) == len(DATES) + 1

    poll_until(backfill_runs_created, timeout=60, message=lambda: f"backfill runs not created: {runs}")

    # Follow every task instance; SIGKILL the worker of the first collect caught running.
    ran_on: dict[tuple[str, str, int], str] = {}  # (run, task[map], try) -> worker
    killed: dict[str, str] = {}

    def tis() -> list[dict]:
        out = []
        for run_id in runs:
            for ti in cluster.task_instances(DAG_ID, run_id):
                ti["run_id"] = run_id
                out.append(ti)
        return out

    def watch() -> bool:
        current = tis()
        for ti in current:
            worker = _worker_of(ti)
            if worker:
                task = f"{ti['task_id']}[{ti.get('map_index', -1)}]"
                ran_on[(ti["run_id"], task, ti["try_number"])] = worker
        if not killed:
            for ti in current:
                if ti["task_id"] == "batch.collect" and ti["state"] == "running" and _worker_of(ti):
                    killed["worker"], killed["run_id"] = _worker_of(ti), ti["run_id"]
                    cluster.kill_worker(killed["worker"], signal.SIGKILL)
                    break
        failed = [f"{t['run_id']}:{t['task_id']}" for t in current if t["state"] in FAILED]
        assert not failed, f"tasks failed: {failed}\n{cluster.log_tail(3000)}"
        states = {run_id: cluster.dag_run(DAG_ID, run_id)["state"] for run_id in runs}
        return all(s == "success" for s in states.values())

    poll_until(
        watch,
        timeout=RUN_TIMEOUT,
        interval=0.3,
        message=lambda: f"runs not all successful: { {r: cluster.task_states(DAG_ID, r) for r in runs} }",
    )
    wall = time.monotonic() - started
    print(f"scenario wall time {wall:.0f}s; killed {killed}; tasks per worker:", end=" ")
    print({w: sum(1 for v in ran_on.values() if v == w) for w in cluster.worker_names()})

    # A collect was caught running and its worker killed; the run still finished (on the other one).
    assert killed, "no collect was caught running: the kill never happened"
    survivor = next(w for w in cluster.worker_names() if w != killed["worker"])
    retried = [k for k, w in ran_on.items() if k[0] == killed["run_id"] and k[1].startswith("batch.collect")]
    assert {ran_on[k] for k in retried} >= {survivor}, retried
    # Tasks landed on both workers.
    assert set(ran_on.values()) == set(cluster.worker_names()), ran_on

    # Exactly one batch per chunk, counted at the emulator: the manual run re-attached to its date's.
    batches = list(client.messages.batches.list(limit=100))
    n_chunks = 0
    published: set[str] = set()
    for date in DATES:
        work = f"bulk_extraction/work/date={date.isoformat()}"
        n_chunks += len(json.loads(_read(cluster, f"{work}/requests/manifest.json"))["chunks"])
        # Read as any reader must: through the partition's commit file, on S3.
        commit = json.loads(
            _read(cluster, f"bulk_extraction/extractions/date={date.isoformat()}/_COMMIT.json")
        )
        part = f"bulk_extraction/extractions/date={date.isoformat()}"
        files = {name: f"{part}/{entry['path']}" for name, entry in commit["files"].items()}
        summary = json.loads(_read(cluster, files["summary.json"]))
        rows = pq.read_table(io.BytesIO(_read(cluster, files["data.parquet"])), columns=["ticket_id"])
        ids = rows.column("ticket_id").to_pylist()
        expected = valid_ticket_ids(date, PER_DAY, seed=7)
        assert sorted(ids) == sorted(expected), date  # complete, each record once
        assert summary["n_rows"] == len(ids)
        published |= set(summary["batch_ids"])
    assert len(batches) == n_chunks, [(b.id, b.request_counts) for b in batches]
    assert {b.id for b in batches} == published

    # Nothing landed in the checkout's data/ (nor in the workers' working directories).
    assert _tree(REPO_ROOT / "data") == data_before
    for name in cluster.worker_names():
        workdir = cluster.airflow_home / "workers" / name
        assert not [p for p in workdir.rglob("*") if p.is_file()], f"{name} wrote into its cwd"

    # The Batches page reads the ledger and the summaries from S3.
    page = cluster.api("GET", "/anthropic-batches/api/batches")
    partitions = {r["partition"] for r in page["runs"] if r["dag_id"] == DAG_ID}
    assert partitions >= {d.isoformat() for d in DATES}, page["runs"]
    assert {b["batch_id"] for b in page["batches"]} >= published
    assert cluster.storage_root.startswith(f"s3://{AWS_CONN_ID}@")
