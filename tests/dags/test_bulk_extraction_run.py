"""bulk_extraction end to end with dag.test() against the emulator (no mocks): one row per valid record."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow.parquet as pq
import pytest
from demo.generate_data import OVERSIZED_CHARS, generate_tickets, write_tickets

from tests.dags.conftest import DAGS_DIR

DATE = dt.date(2026, 11, 1)
PER_DAY = 60  # > 2 chunks of 25, so the mapped batch group really fans out


def _valid_ticket_ids(records: list[dict]) -> tuple[set[str], set]:
    counts: dict = {}
    for r in records:
        counts[r["ticket_id"]] = counts.get(r["ticket_id"], 0) + 1
    valid = {
        r["ticket_id"]
        for r in records
        if r["ticket_id"] is not None
        and counts[r["ticket_id"]] == 1
        and (r["body"] or "").strip()
        and len(r["body"]) < OVERSIZED_CHARS
    }
    invalid = {r["ticket_id"] for r in records} - valid
    return valid, invalid


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    root = f"file://{tmp_path / 'data'}"
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", root)
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    return tmp_path / "data"


def test_bulk_extraction_publishes_one_row_per_valid_record(airflow_db, anthropic_conn, storage_root):
    from airflow.dag_processing.dagbag import DagBag

    records = generate_tickets(DATE, PER_DAY, seed=7)
    write_tickets(storage_root, DATE, per_day=PER_DAY, seed=7)
    valid, invalid = _valid_ticket_ids(records)
    assert invalid  # the generator's deliberate bad records are there

    bag = DagBag(dag_folder=str(DAGS_DIR / "pipelines.py"))
    assert bag.import_errors == {}
    dag = bag.dags["bulk_extraction"]
    run = dag.test(
        logical_date=dt.datetime.combine(DATE, dt.time(), tzinfo=dt.UTC), run_conf={"mode": "batch"}
    )
    assert str(getattr(run.state, "value", run.state)) == "success"

    partition = storage_root / "bulk_extraction" / "extractions" / f"date={DATE}"
    data = pq.read_table(partition / "data.parquet").to_pylist()
    assert sorted(r["ticket_id"] for r in data) == sorted(valid)  # exactly one row per valid record
    assert all(r["status"] for r in data)

    dead = pq.read_table(partition / "dead_letter.parquet").to_pylist()
    prepare_rejects = [d for d in dead if d["stage"] == "prepare"]
    assert {d["ticket_id"] for d in prepare_rejects} == invalid
    assert all(d["reason"] for d in dead)

    summary = json.loads((partition / "summary.json").read_text())
    assert summary["n_input_records"] == len(records)
    assert summary["n_rows"] == len(data)
    assert sum(summary["counts_by_status"].values()) == len(data)
    assert summary["n_dead_letters"] == len(dead)
    assert summary["mode"] == "batch"
    assert summary["cost_usd"] > 0
    # The batch price is half the synchronous one, and the savings are the difference.
    assert summary["cost_usd"] == pytest.approx(summary["sync_cost_usd"] / 2, rel=1e-6)
    assert summary["savings_usd"] == pytest.approx(summary["sync_cost_usd"] - summary["cost_usd"], abs=1e-6)
    billed = sum(
        r["cost_usd"] or 0
        for f in (storage_root / "bulk_extraction" / "work" / f"date={DATE}" / "results").glob(
            "attempt-*/*.parquet"
        )
        if not f.name.startswith(".")
        for r in pq.read_table(f, columns=["cost_usd"]).to_pylist()
    )
    assert summary["cost_usd"] == pytest.approx(billed, abs=1e-6)
    assert len(summary["batch_ids"]) >= 3  # one per chunk, plus any resubmit batches
