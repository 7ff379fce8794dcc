"""bulk_extraction end to end with dag.test() against the emulator (no mocks): one row per valid record."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from demo.generate_data import generate_tickets, valid_ticket_ids, write_tickets

from tests.dags.conftest import DAGS_DIR

DATE = dt.date(2026, 11, 1)
PER_DAY = 60  # > 2 chunks of 25, so the mapped batch group really fans out


def _published(storage_root, date) -> Path:
    """The committed generation's directory of a published partition (read through its commit)."""
    from anthropic_batch.partition import published_dir

    return Path(published_dir(f"file://{storage_root}/bulk_extraction/extractions/date={date}").path)


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
    valid = valid_ticket_ids(DATE, PER_DAY, seed=7)
    invalid = {r["ticket_id"] for r in records} - valid
    assert invalid  # the generator's deliberate bad records are there

    bag = DagBag(dag_folder=str(DAGS_DIR / "pipelines.py"))
    assert bag.import_errors == {}
    dag = bag.dags["bulk_extraction"]
    run = dag.test(
        logical_date=dt.datetime.combine(DATE, dt.time(), tzinfo=dt.UTC), run_conf={"mode": "batch"}
    )
    assert str(getattr(run.state, "value", run.state)) == "success"

    partition = _published(storage_root, DATE)
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
    # The batch price is half the synchronous one, and the savings are the difference; the sample
    # gate's answers (synchronous price) are in both totals.
    sample = summary["sample_cost_usd"]
    assert sample > 0
    assert summary["cost_usd"] - sample == pytest.approx((summary["sync_cost_usd"] - sample) / 2, rel=1e-6)
    assert summary["savings_usd"] == pytest.approx(summary["sync_cost_usd"] - summary["cost_usd"], abs=1e-6)
    billed = sum(
        r["cost_usd"] or 0
        for f in (storage_root / "bulk_extraction" / "work" / f"date={DATE}" / "results").glob(
            "attempt-*/*.parquet"
        )
        if not f.name.startswith(".")
        for r in pq.read_table(f, columns=["cost_usd"]).to_pylist()
    )
    assert summary["cost_usd"] == pytest.approx(billed + sample, abs=1e-6)
    assert len(summary["batch_ids"]) >= 3  # one per chunk, plus any resubmit batches


def test_bulk_extraction_resubmits_retriable_failures_under_dag_test(
    airflow_db, emulator_factory, storage_root, monkeypatch
):
    """dag.test() resumes a deferred task with the trigger event only; the resubmit loop must still
    run its rounds (its state is on storage) and end with one final row per valid record."""
    from airflow.dag_processing.dagbag import DagBag

    emu = emulator_factory(
        "--processing-seconds", "1",
        "--error-rate", "overloaded_error=0.2",
        "--invalid-output-rate", "0.1",
        "--truncate-rate", "0.05",
        "--seed", "5",
    )  # fmt: skip
    conn = {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(conn))
    date = dt.date(2026, 11, 4)
    write_tickets(storage_root, date, per_day=PER_DAY, seed=7)
    valid = valid_ticket_ids(date, PER_DAY, seed=7)

    bag = DagBag(dag_folder=str(DAGS_DIR / "pipelines.py"))
    assert bag.import_errors == {}
    run = bag.dags["bulk_extraction"].test(
        logical_date=dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC), run_conf={"mode": "batch"}
    )
    assert str(getattr(run.state, "value", run.state)) == "success"

    partition = _published(storage_root, date)
    summary = json.loads((partition / "summary.json").read_text())
    assert summary["attempts"] >= 2  # resubmit rounds ran (and resumed) under dag.test()
    data = pq.read_table(partition / "data.parquet").to_pylist()
    assert sorted(r["ticket_id"] for r in data) == sorted(valid)  # exactly one final row each
    assert any(r["attempt"] >= 2 and r["status"] == "succeeded" for r in data)
    # Whatever did not succeed in the end is dead-lettered with its reason, never lost.
    dead = pq.read_table(partition / "dead_letter.parquet").to_pylist()
    collect_dead = {d["ticket_id"] for d in dead if d["stage"] == "collect"}
    assert {r["ticket_id"] for r in data if r["status"] != "succeeded"} == collect_dead
    work = storage_root / "bulk_extraction" / "work" / f"date={date}"
    state = json.loads((work / "results" / "resubmit-state.json").read_text())
    assert state["phase"] == "finished" and state["attempt"] == summary["attempts"]
    assert [r["attempt"] for r in state["rounds"]] == list(range(2, summary["attempts"] + 1))


def _run(dag_file: str, dag_id: str, logical: dt.datetime, conf: dict) -> str:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR / dag_file))
    assert bag.import_errors == {}
    run = bag.dags[dag_id].test(logical_date=logical, run_conf=conf)
    return str(getattr(run.state, "value", run.state))


def _batch_ids(emulator) -> set[str]:
    import anthropic

    client = anthropic.Anthropic(api_key=emulator.api_key, base_url=emulator.base_url)
    return {b.id for b in client.messages.batches.list(limit=100)}


def test_mode_sync_sends_no_batch(airflow_db, anthropic_conn, emulator, storage_root):
    date = dt.date(2026, 11, 2)
    write_tickets(storage_root, date, per_day=12, seed=7)
    valid = valid_ticket_ids(date, 12, seed=7)
    before = _batch_ids(emulator)
    logical = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
    assert _run("pipelines.py", "bulk_extraction", logical, {"mode": "sync"}) == "success"
    assert _batch_ids(emulator) == before  # the Messages API only
    partition = _published(storage_root, date)
    summary = json.loads((partition / "summary.json").read_text())
    assert summary["mode"] == "sync"
    assert summary["n_rows"] == len(valid)
    assert summary["cost_usd"] == pytest.approx(summary["sync_cost_usd"], abs=1e-9)  # no discount


def test_mode_auto_with_a_near_deadline_runs_sync(airflow_db, anthropic_conn, emulator, storage_root):
    from anthropic_batch.pipeline_config import PIPELINES_DIR, load_pipeline

    date = dt.date(2026, 11, 4)
    write_tickets(storage_root, date, per_day=80, seed=7)
    valid = valid_ticket_ids(date, 80, seed=7)
    # Too many requests for auto's size rule alone: only the deadline can pick sync here.
    assert len(valid) > load_pipeline(PIPELINES_DIR / "bulk_extraction.yaml").auto_sync_max_requests
    deadline = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).isoformat()
    before = _batch_ids(emulator)
    logical = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
    conf = {"mode": "auto", "deadline": deadline}
    assert _run("pipelines.py", "bulk_extraction", logical, conf) == "success"
    assert _batch_ids(emulator) == before
    partition = _published(storage_root, date)
    summary = json.loads((partition / "summary.json").read_text())
    assert summary["mode"] == "sync"
    assert summary["n_rows"] == len(valid)


def test_overnight_report_renders_the_published_day(airflow_db, anthropic_conn, storage_root):
    date = dt.date(2026, 11, 3)
    write_tickets(storage_root, date, per_day=20, seed=7)
    logical = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
    assert _run("pipelines.py", "bulk_extraction", logical, {"mode": "batch"}) == "success"
    state = _run(
        "overnight_report.py",
        "overnight_report",
        logical + dt.timedelta(hours=6, minutes=30),
        {"date": date.isoformat(), "mode": "batch"},
    )
    assert state == "success"
    report_dir = storage_root / "reports" / f"date={date}"
    report = json.loads((report_dir / "report.json").read_text())
    data = pq.read_table(_published(storage_root, date) / "data.parquet").to_pylist()
    succeeded = [json.loads(r["output_json"]) for r in data if r["status"] == "succeeded"]
    assert sum(g["n"] for g in report["groups"]) == len(succeeded)
    assert {g["name"] for g in report["groups"]} == {s["category"] for s in succeeded}
    # One narrative per category, from one batch (the report's own work dir has a single chunk).
    assert all(g["narrative_status"] == "succeeded" and g["narrative"] for g in report["groups"])
    manifest = json.loads(
        (
            storage_root / "overnight_report" / "work" / f"date={date}" / "requests" / "manifest.json"
        ).read_text()
    )
    assert len(manifest["chunks"]) == 1 and manifest["n_requests"] == len(report["groups"])
    page = (report_dir / "report.html").read_text()
    assert page.count("<svg") == 4 and "<script" not in page
    assert (report_dir / "report.md").read_text().startswith("# Overnight report")
