"""PublishPartitionOperator: partition files, summary numbers, atomic replacement."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anthropic_batch import storage
from anthropic_batch.operators.publish import (
    DATA_FILE,
    DEAD_LETTER_FILE,
    SUCCESS_MARKER,
    SUMMARY_FILE,
    PublishPartitionOperator,
    publish_partition,
)
from anthropic_batch.results import dead_letter_schema, result_schema
from tests.plugins.anthropic_batch._operator_context import make_context

KEYS = ["ticket_id"]


def _rows(specs: list[tuple[str, str, int, str]]) -> pa.Table:
    """(custom_id, status, attempt, batch_id) -> RESULT rows with simple token/cost numbers."""
    schema = result_schema(KEYS)
    rows = []
    for cid, status, attempt, batch_id in specs:
        billed = status in ("succeeded", "invalid_output")
        rows.append(
            {
                "custom_id": cid,
                "ticket_id": cid,
                "status": status,
                "error_type": None if billed else "api_error",
                "output_text": "{}" if billed else None,
                "model": "claude-haiku-4-5",
                "input_tokens": 100 if billed else 0,
                "output_tokens": 10 if billed else 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 5 if billed else 0,
                "cost_usd": 0.001 if billed else 0.0,
                "sync_cost_usd": 0.002 if billed else 0.0,
                "batch_id": batch_id,
                "attempt": attempt,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema)


def _work_dir(tmp_path: Path, *, rejected: int = 1, dead: int = 1) -> Path:
    work = tmp_path / "work"
    (work / "requests").mkdir(parents=True)
    manifest = {
        "chunks": [],
        "n_requests": 4,
        "n_rejected": rejected,
        "n_input_records": 4 + rejected,
        "mode": "batch",
        "spec": {
            "pipeline": "tickets",
            "partition": "2026-11-01",
            "model": "claude-haiku-4-5",
            "key_columns": KEYS,
        },
    }
    (work / "requests" / "manifest.json").write_text(json.dumps(manifest))
    # Attempt 1: a, b succeed, c errored (retriable), d invalid output (billed, retried).
    attempt1 = _rows(
        [
            ("a", "succeeded", 1, "b1"),
            ("b", "succeeded", 1, "b1"),
            ("c", "errored", 1, "b1"),
            ("d", "invalid_output", 1, "b1"),
        ]
    )
    attempt2 = _rows([("c", "succeeded", 2, "b2"), ("d", "invalid_output", 2, "b2")])
    for name, table in (("attempt-01/b1.parquet", attempt1), ("attempt-02/b2.parquet", attempt2)):
        path = work / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    merged = _rows(
        [
            ("a", "succeeded", 1, "b1"),
            ("b", "succeeded", 1, "b1"),
            ("c", "succeeded", 2, "b2"),
            ("d", "invalid_output", 2, "b2"),
        ]
    )
    pq.write_table(merged, work / "results" / "merged.parquet")
    dl_schema = dead_letter_schema(KEYS)
    if rejected:
        pq.write_table(
            pa.Table.from_pylist(
                [
                    {
                        "ticket_id": None,
                        "stage": "prepare",
                        "status": "rejected",
                        "error_type": "null_key",
                        "reason": "key is null",
                        "attempts": 0,
                        "record_json": "{}",
                    }
                ]
                * rejected,
                schema=dl_schema,
            ),
            work / "rejected.parquet",
        )
    if dead:
        pq.write_table(
            pa.Table.from_pylist(
                [
                    {
                        "ticket_id": "d",
                        "custom_id": "d",
                        "stage": "collect",
                        "status": "invalid_output",
                        "error_type": "invalid_output",
                        "reason": "exhausted 2 attempts",
                        "attempts": 2,
                        "last_batch_id": "b2",
                    }
                ]
                * dead,
                schema=dl_schema,
            ),
            work / "dead_letter.parquet",
        )
    return work


def url(path: Path) -> str:
    """A file URL as the DAG factory builds them (storage paths contain ``date=``, kept literal)."""
    return f"file://{path}"


def _publish(work: Path, target: Path) -> dict:
    op = PublishPartitionOperator(
        task_id="publish",
        work_dir=url(work),
        merged_path=url(work / "results" / "merged.parquet"),
        extraction_dir=url(target),
    )
    return op.execute(make_context(task_id="publish"))


def test_publish_writes_data_dead_letters_and_summary(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    summary = _publish(work, target)

    assert sorted(os.listdir(target)) == sorted([DATA_FILE, DEAD_LETTER_FILE, SUMMARY_FILE, SUCCESS_MARKER])
    data = pq.read_table(target / DATA_FILE)
    assert sorted(data["custom_id"].to_pylist()) == ["a", "b", "c", "d"]
    dead = pq.read_table(target / DEAD_LETTER_FILE).to_pylist()
    assert sorted(r["stage"] for r in dead) == ["collect", "prepare"]
    assert json.loads((target / SUMMARY_FILE).read_text()) == summary

    assert summary["pipeline"] == "tickets" and summary["partition"] == "2026-11-01"
    assert summary["dag_id"] == "test_dag" and summary["mode"] == "batch"
    assert summary["n_input_records"] == 5 and summary["n_rows"] == 4
    assert summary["counts_by_status"] == {"invalid_output": 1, "succeeded": 3}
    assert summary["n_dead_letters"] == 2
    # Spend counts every attempt: 3 billed rows in attempt 1, 2 in attempt 2.
    assert summary["tokens"] == {"input": 500, "output": 50, "cache_creation": 0, "cache_read": 25}
    assert summary["cost_usd"] == pytest.approx(0.005)
    assert summary["sync_cost_usd"] == pytest.approx(0.010)
    assert summary["savings_usd"] == pytest.approx(0.005)
    assert summary["batch_ids"] == ["b1", "b2"]
    assert summary["attempts"] == 2
    assert summary["price_table_as_of"]
    assert summary["data_path"].endswith(f"date=2026-11-01/{DATA_FILE}")


def test_republishing_replaces_the_partition_whole(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an older layout")
    _publish(work, target)
    assert not (target / "stale.txt").exists()

    # Second run with fewer dead letters: the new files replace the old ones entirely.
    work2 = _work_dir(tmp_path / "second", rejected=0, dead=0)
    summary = _publish(work2, target)
    assert summary["n_dead_letters"] == 0
    assert pq.read_table(target / DEAD_LETTER_FILE).num_rows == 0
    # No staging or trash directories are left next to the partition.
    assert sorted(os.listdir(target.parent)) == ["date=2026-11-01"]


def test_failed_write_leaves_the_previous_partition_intact(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    before = _publish(work, target)
    # The dead-letter write fails after data.parquet was staged: nothing of it may show.
    with pytest.raises(ValueError):
        publish_partition(
            storage.as_path(url(target)),
            pq.read_table(target / DATA_FILE).slice(0, 1),
            [],  # not a table: write_parquet_atomic refuses it
            {"n_rows": 1},
        )
    assert json.loads((target / SUMMARY_FILE).read_text()) == before
    assert pq.read_table(target / DATA_FILE).num_rows == 4
    assert sorted(os.listdir(target.parent)) == ["date=2026-11-01"]


def test_whole_chain_publishes_one_row_per_valid_record(tmp_path, emulator_factory, monkeypatch):
    """prepare -> sample gate -> submit -> collect -> resubmit (deferred) -> publish, with faults."""
    from anthropic_batch.operators.sample_refine import SampleRefineOperator
    from tests.plugins.anthropic_batch._operator_context import (
        prepare_run,
        submit_chunks,
        ticket_records,
        use_emulator,
    )
    from tests.plugins.anthropic_batch.test_resubmit import (
        _collect_all,
        _operator_factory,
        run_with_deferrals,
    )

    emu = emulator_factory(
        "--processing-seconds", "0.5", "--error-rate", "overloaded_error=0.2",
        "--error-rate", "invalid_request_error=0.1", "--seed", "21",
    )  # fmt: skip
    use_emulator(monkeypatch, emu)
    records = [*ticket_records(24), {"ticket_id": None, "subject": "no key", "body": "x"}]
    run = prepare_run(tmp_path, records, per_chunk=10)
    SampleRefineOperator(
        task_id="sample_refine", work_dir=run.work_dir, sample_size=4, min_pass_rate=0.0
    ).execute(make_context(task_id="sample_refine"))
    paths = _collect_all(run, submit_chunks(run))
    merged_path, _ = run_with_deferrals(_operator_factory(run, paths), make_context(task_id="resubmit"))
    # A stale attempt file from an earlier run of this partition must not be billed again.
    record = json.loads(
        (run.root / "tickets" / "work" / "date=2026-11-01" / "results" / "merged.json").read_text()
    )
    billed = [pq.read_table(p.removeprefix("file://")) for p in record["results_paths"]]
    expected_cost = sum(sum(t["cost_usd"].to_pylist()) for t in billed)
    stale = Path(record["results_paths"][0].removeprefix("file://"))
    (stale.parent / "msgbatch_from_an_earlier_run.parquet").write_bytes(stale.read_bytes())
    target = run.root / "tickets" / "extractions" / "date=2026-11-01"
    op = PublishPartitionOperator(
        task_id="publish",
        work_dir=run.work_dir,
        merged_path=merged_path,
        extraction_dir=url(target),
        pipeline="tickets",
    )
    summary = op.execute(make_context(task_id="publish"))

    data = pq.read_table(target / DATA_FILE)
    assert sorted(data["custom_id"].to_pylist()) == sorted(r["ticket_id"] for r in records[:24])
    dead = pq.read_table(target / DEAD_LETTER_FILE).to_pylist()
    stages = Counter(r["stage"] for r in dead)
    assert stages["prepare"] == 1 and stages["collect"] >= 1
    not_ok = {r["custom_id"] for r in data.to_pylist() if r["status"] != "succeeded"}
    assert not_ok == {r["custom_id"] for r in dead if r["stage"] == "collect"}
    assert summary["n_rows"] == 24 and summary["n_input_records"] == 25
    assert summary["n_dead_letters"] == len(dead)
    assert sum(summary["counts_by_status"].values()) == 24
    assert summary["attempts"] >= 2 and len(summary["batch_ids"]) >= 4  # 3 chunks + at least one retry
    assert 0 < summary["cost_usd"] < summary["sync_cost_usd"]
    sample_cost = json.loads(
        (run.root / "tickets" / "work" / "date=2026-11-01" / "sample" / "report.json").read_text()
    )["sample_cost_usd"]
    # The run's cost is what was collected plus what the sample gate paid.
    assert summary["cost_usd"] == pytest.approx(expected_cost + sample_cost, abs=2e-6)
    assert record["attempts"] == summary["attempts"]
    assert summary["savings_usd"] == pytest.approx(summary["sync_cost_usd"] - summary["cost_usd"], abs=1e-6)
    assert summary["sample_cost_usd"] == pytest.approx(sample_cost) and sample_cost > 0


def test_object_store_partition_is_marked_complete_only_by_success_written_last():
    """On an object store (fsspec memory here) there is no directory rename: _SUCCESS is the signal."""
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach(protocol="memory", fs=MemoryFileSystem())
    target = storage.as_path("memory://bucket/tickets/extractions/date=2026-11-01")
    merged = _rows([("a", "succeeded", 1, "b1")])
    empty_dead = dead_letter_schema(KEYS).empty_table()
    publish_partition(target, merged, empty_dead, {"n_rows": 1})
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [DATA_FILE, DEAD_LETTER_FILE, SUMMARY_FILE, SUCCESS_MARKER]
    )
    # A republish that fails midway leaves no _SUCCESS: readers know the partition is incomplete.
    with pytest.raises(ValueError):
        publish_partition(target, merged, [], {"n_rows": 1})
    assert not (target / SUCCESS_MARKER).exists()
    publish_partition(target, merged, empty_dead, {"n_rows": 2})
    assert (target / SUCCESS_MARKER).exists()
    assert storage.read_json(target / SUMMARY_FILE) == {"n_rows": 2}
    assert not [p.name for p in target.iterdir() if storage.TMP_MARKER in p.name]
