"""A rerun of bulk_extraction under dag.test() sends only the records that changed (issue 9, item 3).

Through the real DAG: prepare (answer reuse) -> sample gate -> mapped batch group -> resubmit (merge
with the reused answers) -> publish. Batches are counted on the emulator with the SDK's batch list.
"""

from __future__ import annotations

import datetime as dt
import json

import anthropic
import pyarrow.parquet as pq
import pytest
from demo.generate_data import generate_tickets, tickets_path, valid_ticket_ids, write_tickets

from tests.dags.conftest import DAGS_DIR

DATE = dt.date(2026, 11, 3)
PER_DAY = 60


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    root = f"file://{tmp_path / 'data'}"
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", root)
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    return tmp_path / "data"


def _batches(emulator) -> dict[str, int]:
    client = anthropic.Anthropic(api_key=emulator.api_key, base_url=emulator.base_url, max_retries=0)
    return {b.id: sum(b.request_counts.to_dict().values()) for b in client.messages.batches.list(limit=1000)}


def _run(dag) -> None:
    run = dag.test(
        logical_date=dt.datetime.combine(DATE, dt.time(), tzinfo=dt.UTC), run_conf={"mode": "batch"}
    )
    assert str(getattr(run.state, "value", run.state)) == "success"


def _published_rows(extraction) -> list[dict]:
    """The rows of the partition's committed generation (read through its commit file)."""
    from anthropic_batch.partition import published_dir

    return pq.read_table(published_dir(extraction).path + "/data.parquet").to_pylist()


def test_rerun_of_an_edited_date_sends_only_the_changes(airflow_db, anthropic_conn, emulator, storage_root):
    from airflow.dag_processing.dagbag import DagBag

    write_tickets(storage_root, DATE, per_day=PER_DAY, seed=11)
    dag = DagBag(dag_folder=str(DAGS_DIR / "pipelines.py")).dags["bulk_extraction"]
    before = _batches(emulator)
    _run(dag)
    first_batches = set(_batches(emulator)) - set(before)
    extraction = storage_root / "bulk_extraction" / "extractions" / f"date={DATE}"
    first = {r["ticket_id"]: r for r in _published_rows(extraction)}

    records = generate_tickets(DATE, PER_DAY, seed=11)
    valid = valid_ticket_ids(DATE, PER_DAY, seed=11)
    edit, drop = sorted(valid)[:2]
    edited = [r for r in records if r["ticket_id"] != drop]
    for r in edited:
        if r["ticket_id"] == edit:
            r["body"] = "The charger sparks when plugged in. Please advise."
    edited.append(
        {**next(r for r in records if r["ticket_id"] == edit), "ticket_id": "NEW-1", "body": "Hello?"}
    )
    tickets_path(storage_root, DATE).write_text(
        "".join(json.dumps(r) + "\n" for r in edited), encoding="utf-8"
    )
    mid = _batches(emulator)
    _run(dag)

    new = {b: n for b, n in _batches(emulator).items() if b not in mid}
    assert sorted(new.values()) == [2]  # one batch, the edited and the added record
    data = {r["ticket_id"]: r for r in _published_rows(extraction)}
    assert set(data) == (valid - {drop}) | {"NEW-1"}
    for ticket_id in set(data) - {edit, "NEW-1"}:
        assert data[ticket_id]["output_json"] == first[ticket_id]["output_json"]
        assert data[ticket_id]["attempt"] == 0 and data[ticket_id]["batch_id"] in first_batches
    from anthropic_batch.partition import read_published_summary

    summary = read_published_summary(extraction)
    assert summary.n_reused == len(data) - 2 and summary.batch_ids == sorted(new)
