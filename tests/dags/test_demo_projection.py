"""Issue 13: on the demo day the sample's projection holds, and the batches read the prompt cache.

bulk_extraction exactly as ``make demo`` runs it (its pipeline YAML with a 20-record sample, the
demo's emulator flags and faults, a day of 40+ generated tickets), with ``dag.test()``.
"""

from __future__ import annotations

import datetime as dt
import json

from demo.generate_data import write_tickets
from demo.run_demo import EMULATOR_FLAGS, FAULT_FLAGS, projection_vs_actual

from tests.dags.conftest import DAGS_DIR

DEMO_DATE = dt.date(2026, 11, 29)
TOLERANCE_PCT = 10.0


def test_the_demo_projection_lands_within_ten_percent_and_chunks_read_the_cache(
    airflow_db, emulator_factory, tmp_path, monkeypatch
):
    from airflow.dag_processing.dagbag import DagBag

    emu = emulator_factory(*EMULATOR_FLAGS, *FAULT_FLAGS)
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
        json.dumps({"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}),
    )
    root = f"file://{tmp_path / 'data'}"
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", root)
    monkeypatch.setenv("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    write_tickets(tmp_path / "data", DEMO_DATE, per_day=40)

    dag = DagBag(dag_folder=str(DAGS_DIR / "pipelines.py")).dags["bulk_extraction"]
    run = dag.test(
        logical_date=dt.datetime.combine(DEMO_DATE, dt.time(), tzinfo=dt.UTC), run_conf={"mode": "batch"}
    )
    assert str(getattr(run.state, "value", run.state)) == "success"

    check = projection_vs_actual(root, DEMO_DATE.isoformat())
    print("demo cost check:", json.dumps({k: v for k, v in check.items() if k != "breakdown"}))
    assert check["n_sampled"] == 20 and check["cache_warning"] is None
    assert abs(check["error_pct"]) <= TOLERANCE_PCT, check
    # Without caching the projection would be far off: caching is most of the story.
    assert check["projected_without_caching_usd"] > 2 * check["actual_usd"]
    # The sample wrote the 1-hour cache; every chunk's batch reads the shared rubric.
    assert len(check["batches"]) >= 2
    assert all(b["cache_reads"] > 0 for b in check["batches"][1:]), check["batches"]
    assert check["breakdown"]["cache_read_tokens"] > 0 and check["breakdown"]["cache_saving_usd"] > 0
