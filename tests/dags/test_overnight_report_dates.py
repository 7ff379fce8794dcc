"""overnight_report over several dates with dag.test() against the emulator: one report per date."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.dags.conftest import DAGS_DIR

CATEGORIES = {"2026-11-05": ["billing", "bug", "billing"], "2026-11-06": ["shipping", "account"]}


def _publish(root, date: str, categories: list[str]) -> None:
    """A published bulk_extraction partition, as publish leaves it (the columns the report reads)."""
    directory = root / "bulk_extraction" / "extractions" / f"date={date}"
    directory.mkdir(parents=True)
    outputs = [
        {"category": c, "priority": "low", "sentiment": "neutral", "summary": f"{c} {i}", "product": None}
        for i, c in enumerate(categories)
    ]
    table = pa.table(
        {
            "custom_id": [f"t{i}" for i in range(len(categories))],
            "status": ["succeeded"] * len(categories),
            "output_json": [json.dumps(o) for o in outputs],
        }
    )
    pq.write_table(table, directory / "data.parquet")
    summary = {"pipeline": "bulk_extraction", "partition": date, "run_id": f"backfill__{date}"}
    summary |= {"mode": "batch"}
    summary |= {"n_input_records": len(categories), "n_rows": len(categories), "n_dead_letters": 0}
    summary |= {"cost_usd": 0.01, "sync_cost_usd": 0.02, "savings_usd": 0.01, "batch_ids": ["msgbatch_x"]}
    (directory / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def storage_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    return tmp_path / "data"


def test_one_report_run_renders_a_report_for_every_date(airflow_db, anthropic_conn, storage_root):
    from airflow.dag_processing.dagbag import DagBag

    for date, categories in CATEGORIES.items():
        _publish(storage_root, date, categories)
    bag = DagBag(dag_folder=str(DAGS_DIR / "overnight_report.py"))
    assert bag.import_errors == {}
    run = bag.dags["overnight_report"].test(
        logical_date=dt.datetime(2026, 11, 7, 6, 30, tzinfo=dt.UTC),
        run_conf={"date": ",".join(CATEGORIES), "mode": "batch"},
    )
    assert str(getattr(run.state, "value", run.state)) == "success"

    for date, categories in CATEGORIES.items():
        report = json.loads((storage_root / "reports" / f"date={date}" / "report.json").read_text())
        assert report["date"] == date
        assert {g["name"] for g in report["groups"]} == set(categories)
        assert all(g["narrative_status"] == "succeeded" and g["narrative"] for g in report["groups"])
        assert (storage_root / "reports" / f"date={date}" / "report.html").exists()
    # All narratives of both dates went out in one batch, keyed by (date, category).
    work = storage_root / "overnight_report" / "work" / "date=2026-11-06"
    manifest = json.loads((work / "requests" / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 1
    assert manifest["n_requests"] == sum(len(set(c)) for c in CATEGORIES.values())
    assert manifest["spec"]["key_columns"] == ["date", "category"]
