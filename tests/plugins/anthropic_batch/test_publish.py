"""PublishPartitionOperator: partition files, summary numbers, the commit protocol (one-step switch)."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anthropic_batch import partition, storage
from anthropic_batch.operators.publish import (
    COMMIT_FILE,
    DATA_FILE,
    DEAD_LETTER_FILE,
    SUCCESS_MARKER,
    SUMMARY_FILE,
    PublishPartitionOperator,
)
from anthropic_batch.partition import published_files
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


def _publish(work: Path, target: Path | str) -> dict:
    op = PublishPartitionOperator(
        task_id="publish",
        work_dir=url(work),
        merged_path=url(work / "results" / "merged.parquet"),
        extraction_dir=target if isinstance(target, str) else url(target),
    )
    return op.execute(make_context(task_id="publish"))


def test_publish_writes_data_dead_letters_and_summary(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    summary = _publish(work, target)

    published = published_files(url(target))
    assert published is not None and published.generation
    generation_dir = f"_gen={published.generation}"
    assert sorted(os.listdir(target)) == sorted([COMMIT_FILE, SUCCESS_MARKER, generation_dir])
    assert sorted(os.listdir(target / generation_dir)) == sorted([DATA_FILE, DEAD_LETTER_FILE, SUMMARY_FILE])
    commit = json.loads((target / COMMIT_FILE).read_text())
    assert (
        commit["generation"] == published.generation
        and commit["run_id"] == "manual__2026-11-01T00:00:00+00:00"
    )
    for name in (DATA_FILE, DEAD_LETTER_FILE, SUMMARY_FILE):
        assert commit["files"][name] == {
            "path": f"{generation_dir}/{name}",
            "size": (target / generation_dir / name).stat().st_size,
        }
    data = pq.read_table(published.data_path.path)
    assert sorted(data["custom_id"].to_pylist()) == ["a", "b", "c", "d"]
    dead = pq.read_table(published.dead_letter_path.path).to_pylist()
    assert sorted(r["stage"] for r in dead) == ["collect", "prepare"]
    assert published.read_summary().model_dump(mode="json") == summary

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
    assert summary["data_path"] == str(published.data_path)
    assert summary["n_dead_letters_by_stage"] == {"collect": 1, "prepare": 1}


def test_summary_cost_breakdown_splits_cache_writes_reads_and_both_savings(tmp_path):
    """Issue 13: every attempt's tokens per model, priced by pricing.PriceTable.breakdown."""
    from anthropic_batch.pricing import CostBreakdown, load_price_table

    work = _work_dir(tmp_path)
    extra = _rows([("e", "succeeded", 1, "b3")]).to_pylist()
    extra[0].update(cache_creation_input_tokens=4200, cache_read_input_tokens=0, input_tokens=300)
    extra.append(
        {
            **extra[0],
            "custom_id": "f",
            "ticket_id": "f",
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4200,
        }
    )
    # A synchronously priced row (mode=sync): cost == sync cost.
    extra.append({**extra[1], "custom_id": "g", "ticket_id": "g", "cost_usd": 0.003, "sync_cost_usd": 0.003})
    pq.write_table(
        pa.Table.from_pylist(extra, schema=result_schema(KEYS)),
        work / "results" / "attempt-01" / "b3.parquet",
    )
    summary = _publish(work, tmp_path / "extractions" / "date=2026-11-01")

    got = CostBreakdown(**summary["cost_breakdown"])
    prices = load_price_table()
    batch_usage = {
        "input_tokens": 500 + 600,
        "output_tokens": 50 + 20,
        "cache_creation_input_tokens": 4200,
        "cache_read_input_tokens": 25 + 4200,
    }
    sync_usage = {"input_tokens": 300, "output_tokens": 10, "cache_read_input_tokens": 4200}
    want = prices.breakdown("claude-haiku-4-5", batch_usage, batch=True) + prices.breakdown(
        "claude-haiku-4-5", sync_usage, batch=False
    )
    assert got == want
    assert (got.cache_write_tokens, got.cache_read_tokens) == (4200, 25 + 4200 + 4200)
    assert got.cache_write_usd > 0 and got.cache_read_usd > 0
    assert got.cache_saving_usd > 0 and got.batch_saving_usd > 0
    # The synchronously priced row saves nothing by batching: only the batch rows do.
    assert got.batch_saving_usd == pytest.approx(
        prices.breakdown("claude-haiku-4-5", batch_usage, batch=True).batch_saving_usd
    )


def test_republishing_replaces_the_partition_whole(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    target.mkdir(parents=True)
    for legacy in ("stale.txt", DATA_FILE, SUMMARY_FILE):  # an older layout's files
        (target / legacy).write_text("from an older layout")
    _publish(work, target)
    first = published_files(url(target))
    assert not (target / "stale.txt").exists() and not (target / DATA_FILE).exists()

    # Second run with fewer dead letters: the new generation replaces the old one entirely.
    work2 = _work_dir(tmp_path / "second", rejected=0, dead=0)
    summary = _publish(work2, target)
    second = published_files(url(target))
    assert second.generation > first.generation
    assert summary["n_dead_letters"] == 0
    assert pq.read_table(second.dead_letter_path.path).num_rows == 0
    assert sorted(os.listdir(target)) == sorted([COMMIT_FILE, SUCCESS_MARKER, f"_gen={second.generation}"])
    # Nothing is left next to the partition either.
    assert sorted(os.listdir(target.parent)) == ["date=2026-11-01"]


def test_failed_write_leaves_the_previous_partition_intact(tmp_path):
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    before = _publish(work, target)
    generation = published_files(url(target)).generation
    # The dead-letter source is corrupt: the new generation fails after data.parquet was written.
    (work / "dead_letter.parquet").write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        _publish(work, target)
    published = published_files(url(target))
    assert published.generation == generation and published.read_summary().model_dump(mode="json") == before
    assert pq.read_table(published.data_path.path).num_rows == 4
    assert sorted(os.listdir(target)) == sorted([COMMIT_FILE, SUCCESS_MARKER, f"_gen={generation}"])


def test_a_reader_never_sees_a_mix_while_a_partition_is_replaced(tmp_path, monkeypatch):
    """After every single storage write of a republish, a reader resolving through the commit
    gets one complete generation: the old one until the commit, the new one after it."""
    work = _work_dir(tmp_path)
    target = tmp_path / "extractions" / "date=2026-11-01"
    _publish(work, target)
    old = published_files(url(target)).generation
    seen: list[str] = []

    def read_consistently() -> None:
        published = published_files(url(target))
        summary = published.read_summary()
        data = pq.read_table(published.data_path.path)
        dead = pq.read_table(published.dead_letter_path.path)
        assert (summary.n_rows, summary.n_dead_letters) == (data.num_rows, dead.num_rows)
        assert summary.data_path == str(published.data_path)
        for entry in published.files.values():
            assert (target / entry["path"]).stat().st_size == entry["size"]
        seen.append(published.generation)

    real_writer = storage.open_atomic_writer

    @contextlib.contextmanager
    def checking_writer(path):
        with real_writer(path) as handle:
            yield handle
        read_consistently()

    monkeypatch.setattr(storage, "open_atomic_writer", checking_writer)
    work2 = _work_dir(tmp_path / "second", rejected=0, dead=0)
    _publish(work2, target)
    read_consistently()
    new = published_files(url(target)).generation
    assert new != old
    # Several writes saw the old generation, then the commit switched every later read to the new one.
    assert seen.count(old) >= 3 and seen[-1] == new
    assert seen == sorted(seen, key=lambda g: g == new)


def test_published_files_reads_the_older_layout_and_nothing(tmp_path):
    target = tmp_path / "extractions" / "date=2026-10-01"
    assert published_files(url(target)) is None
    target.mkdir(parents=True)
    (target / DATA_FILE).write_text("")
    assert published_files(url(target)) is None  # no summary: nothing published
    (target / SUMMARY_FILE).write_text(json.dumps({"n_rows": 3}))
    legacy = published_files(url(target))
    assert legacy.generation is None and legacy.read_summary().n_rows == 3
    assert legacy.data_path.path == str(target / DATA_FILE)
    assert partition.published_dir(url(target)).path == str(target)
    assert partition.read_published_summary(url(target)).n_rows == 3
    (target / COMMIT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=COMMIT_FILE):
        published_files(url(target))


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

    published = published_files(url(target))
    data = pq.read_table(published.data_path.path)
    # custom_id = key + "-" + request digest (batch_requests.make_custom_id)
    assert [c.rsplit("-", 1)[0] for c in data["custom_id"].to_pylist()] == data["ticket_id"].to_pylist()
    assert sorted(data["ticket_id"].to_pylist()) == sorted(r["ticket_id"] for r in records[:24])
    dead = pq.read_table(published.dead_letter_path.path).to_pylist()
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


def test_object_store_partition_switches_by_its_commit_file(tmp_path):
    """On an object store (fsspec memory here) there is no directory rename: the commit is the switch."""
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach(protocol="memory", fs=MemoryFileSystem())
    work = _work_dir(tmp_path)
    target = "memory://bucket/tickets/extractions/date=2026-11-01"
    first = _publish(work, target)
    published = published_files(target)
    root = storage.as_path(target)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [COMMIT_FILE, SUCCESS_MARKER, f"_gen={published.generation}"]
    )
    assert published.read_summary().model_dump(mode="json") == first
    with storage.open_binary(published.data_path) as handle:
        assert pq.read_table(handle).num_rows == 4
    # A republish that fails midway changes nothing readers see.
    (work / "dead_letter.parquet").write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        _publish(work, target)
    assert published_files(target).generation == published.generation
    second = _publish(_work_dir(tmp_path / "second", rejected=0, dead=0), target)
    now = published_files(target)
    assert now.generation != published.generation and now.read_summary().model_dump(mode="json") == second
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [COMMIT_FILE, SUCCESS_MARKER, f"_gen={now.generation}"]
    )
    assert not [p.name for p in root.iterdir() if storage.TMP_MARKER in p.name]
