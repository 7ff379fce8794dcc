"""The urgent rerun: mode=sync on a date whose nightly batches are in flight answers now (dag.test)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pyarrow.parquet as pq
from demo.generate_data import valid_ticket_ids, write_tickets

from tests.dags.conftest import DAGS_DIR, REPO_ROOT
from tests.dags.test_bulk_extraction_run import _run

DATE = dt.date(2026, 11, 6)
PER_DAY = 60  # 3 chunks

_NIGHTLY = """
import datetime as dt, sys
sys.path[:0] = [{plugins!r}, {include!r}, {repo!r}]
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder={dag_file!r}).dags["bulk_extraction"]
dag.test(logical_date=dt.datetime({y}, {m}, {d}, tzinfo=dt.UTC), run_conf={{"mode": "batch"}})
"""


def _batches(client: anthropic.Anthropic) -> list:
    return list(client.messages.batches.list(limit=100))


def test_urgent_sync_run_cancels_the_nightly_batches_and_reuses_their_answers(
    airflow_db, emulator_factory, monkeypatch, tmp_path
):
    emu = emulator_factory("--processing-seconds", "20", "--cancel-seconds", "0.3", "--seed", "5")
    conn = {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(conn))
    root = tmp_path / "data"
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", f"file://{root}")
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    write_tickets(root, DATE, per_day=PER_DAY, seed=7)
    valid = valid_ticket_ids(DATE, PER_DAY, seed=7)
    client = anthropic.Anthropic(api_key=emu.api_key, base_url=emu.base_url)

    # The nightly run, in batch mode, submits its chunks and waits; it is still waiting when the
    # urgent rerun starts (here it is stopped outright, as a worker would be).
    script = _NIGHTLY.format(
        plugins=str(REPO_ROOT / "plugins"),
        include=str(REPO_ROOT / "include"),
        repo=str(REPO_ROOT),
        dag_file=str(DAGS_DIR / "pipelines.py"),
        y=DATE.year,
        m=DATE.month,
        d=DATE.day,
    )
    nightly = subprocess.Popen(
        [sys.executable, "-c", script], env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while len(_batches(client)) < 3:
            assert nightly.poll() is None, "the nightly run ended before submitting its batches"
            assert time.monotonic() < deadline, "the nightly run did not submit its 3 batches"
            time.sleep(0.2)
        # Let the emulator answer part of each batch (its requests finish at seeded moments).
        newest = max(b.created_at for b in _batches(client))
        while dt.datetime.now(dt.UTC) < newest + dt.timedelta(seconds=8):
            time.sleep(0.1)
    finally:
        nightly.kill()
        nightly.wait(timeout=30)
    nightly_ids = sorted(b.id for b in _batches(client))

    logical = dt.datetime.combine(DATE, dt.time(), tzinfo=dt.UTC)
    assert _run("pipelines.py", "bulk_extraction", logical, {"mode": "sync"}) == "success"

    ended = {b.id: b for b in _batches(client)}
    assert sorted(ended) == nightly_ids  # no new batch
    assert all(b.processing_status == "ended" for b in ended.values())
    answered = sum(b.request_counts.succeeded for b in ended.values())
    assert answered > 0 and sum(b.request_counts.canceled for b in ended.values()) > 0

    from anthropic_batch.partition import published_dir

    partition = Path(published_dir(root / "bulk_extraction" / "extractions" / f"date={DATE}").path)
    summary = json.loads((partition / "summary.json").read_text())
    assert summary["mode"] == "sync"
    assert sorted(summary["sync_takeover"]["batch_ids"]) == nightly_ids
    assert summary["sync_takeover"]["n_reused_answers"] == answered
    assert summary["sync_takeover"]["n_paid_twice"] == 0
    data = pq.read_table(partition / "data.parquet").to_pylist()
    assert sorted(r["ticket_id"] for r in data) == sorted(valid)
    # The reused answers were billed at the batch price: the run cost less than all-synchronous.
    assert summary["cost_usd"] < summary["sync_cost_usd"]
