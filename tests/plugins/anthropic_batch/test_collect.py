"""collect_batch / CollectResultsOperator against real emulator batches: counts, idempotence, drops."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from anthropic_batch.batch_requests import iter_chunk_requests
from anthropic_batch.collection import BatchNotEndedError, collect_batch, request_counts_by_bucket
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.operators.collect import CollectResultsOperator
from tests.plugins.anthropic_batch._operator_context import (
    make_context,
    prepare_run,
    submit_chunks,
    ticket_records,
    use_emulator,
    wait_ended,
)


def _local(url: str) -> str:
    return url.removeprefix("file://")


def _collect(handle: dict, work_dir: str) -> str:
    op = CollectResultsOperator(task_id="collect", handle=handle, work_dir=work_dir)
    return op.execute(make_context(task_id="batch.collect"))


def _chunk_ids(chunk_path: str) -> set[str]:
    return {r["custom_id"] for r in iter_chunk_requests(chunk_path)}


def test_collect_matches_request_counts_and_updates_the_ledger(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(25), per_chunk=10)
    handles = submit_chunks(run)
    hook = AnthropicBatchHook()
    for handle in handles:
        batch = wait_ended(hook, handle["batch_id"])
        path = _collect(handle, run.work_dir)
        assert path.endswith(f"/results/attempt-01/{handle['batch_id']}.parquet")
        table = pq.read_table(_local(path))
        ids = table["custom_id"].to_pylist()
        assert len(ids) == len(set(ids)) == handle["n_requests"]
        assert set(ids) == _chunk_ids(handle["chunk_path"])
        counts = request_counts_by_bucket(Counter(table["status"].to_pylist()))
        api = batch["request_counts"]
        assert {k: counts[k] for k in ("succeeded", "errored", "canceled", "expired")} == {
            k: api[k] for k in ("succeeded", "errored", "canceled", "expired")
        }
        assert counts["missing"] == 0
        rows = table.to_pylist()
        assert all(r["custom_id"].startswith(r["ticket_id"] + "-") and r["attempt"] == 1 for r in rows)
        succeeded = [r for r in rows if r["status"] == "succeeded"]
        assert succeeded and all(json.loads(r["output_json"])["category"] for r in succeeded)
        # Batch price is half the synchronous price.
        cost, sync_cost = sum(r["cost_usd"] for r in rows), sum(r["sync_cost_usd"] for r in rows)
        assert cost == pytest.approx(sync_cost / 2) and cost > 0

        entry = json.loads(Path(_local(handle["ledger_path"])).read_text())
        assert entry["state"] == "ended"
        assert entry["processing_status"] == "ended"
        assert entry["collected_path"] == entry["results_path"] == path
        assert entry["cost_usd"] == pytest.approx(cost, abs=1e-6)
        assert entry["sync_cost_usd"] == pytest.approx(sync_cost, abs=1e-6)


def test_collect_rerun_overwrites_the_same_file(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(8), per_chunk=8)
    (handle,) = submit_chunks(run)
    wait_ended(AnthropicBatchHook(), handle["batch_id"])
    first_path = _collect(handle, run.work_dir)
    first = pq.read_table(_local(first_path)).sort_by("custom_id")
    second_path = _collect(handle, run.work_dir)
    assert second_path == first_path
    second = pq.read_table(_local(second_path)).sort_by("custom_id")
    assert second.equals(first)
    # Nothing else (no temp files, no second copy) in the attempt directory.
    assert os.listdir(os.path.dirname(_local(first_path))) == [f"{handle['batch_id']}.parquet"]


def test_dropped_results_stream_is_resumed_without_duplicates(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1", "--drop-results-after-lines", "4")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(15), per_chunk=15)
    (handle,) = submit_chunks(run)
    batch = wait_ended(AnthropicBatchHook(), handle["batch_id"])
    stats = collect_batch(AnthropicBatchHook(), handle, run.work_dir)
    assert stats["n_missing"] == 0
    table = pq.read_table(_local(stats["results_path"]))
    ids = table["custom_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 15
    assert (
        stats["counts_by_status"].get("succeeded", 0) + stats["counts_by_status"].get("invalid_output", 0)
        == batch["request_counts"]["succeeded"]
    )


def test_errored_and_expired_requests_become_rows_with_their_status(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory(
        "--processing-seconds",
        "1",
        "--error-rate",
        "api_error=0.3",
        "--error-rate",
        "invalid_request_error=0.1",
        "--seed",
        "3",
    )
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(30), per_chunk=30)
    (handle,) = submit_chunks(run)
    batch = wait_ended(AnthropicBatchHook(), handle["batch_id"])
    stats = collect_batch(AnthropicBatchHook(), handle, run.work_dir)
    rows = pq.read_table(_local(stats["results_path"])).to_pylist()
    errored = [r for r in rows if r["status"] == "errored"]
    assert len(errored) == batch["request_counts"]["errored"] > 0
    assert {r["error_type"] for r in errored} <= {"api_error", "invalid_request_error"}
    assert all(r["cost_usd"] == 0 for r in errored)  # errored requests are not billed
    assert len(rows) == 30


def test_canceled_batch_keeps_its_succeeded_rows(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "3", "--cancel-seconds", "0.2")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(40), per_chunk=40)
    (handle,) = submit_chunks(run)
    hook = AnthropicBatchHook()
    # The API shows no partial progress before the end, so "part of the batch is done" is judged by
    # the batch's own clock: cancel once a third of its processing time has passed.
    created = datetime.fromisoformat(hook.get_batch(handle["batch_id"]).created_at.isoformat())
    while datetime.now(UTC) < created + timedelta(seconds=1):
        time.sleep(0.05)
    hook.cancel_batch(handle["batch_id"])
    batch = wait_ended(hook, handle["batch_id"])
    stats = collect_batch(hook, handle, run.work_dir)
    counts = stats["counts_by_status"]
    assert stats["n_rows"] == 40
    assert counts.get("canceled", 0) == batch["request_counts"]["canceled"] > 0
    succeeded = counts.get("succeeded", 0) + counts.get("invalid_output", 0)
    assert succeeded == batch["request_counts"]["succeeded"] > 0


def test_collect_refuses_a_batch_that_has_not_ended(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "60")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(3), per_chunk=3)
    (handle,) = submit_chunks(run)
    with pytest.raises(BatchNotEndedError, match="not ended"):
        collect_batch(AnthropicBatchHook(), handle, run.work_dir)


def test_sync_mode_collects_the_results_file_at_full_price(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(6), per_chunk=4, mode="sync")
    handles = submit_chunks(run)
    assert all(h["mode"] == "sync" and h["results_path"] for h in handles)
    for handle in handles:
        path = _collect(handle, run.work_dir)
        rows = pq.read_table(_local(path)).to_pylist()
        assert {r["custom_id"] for r in rows} == _chunk_ids(handle["chunk_path"])
        assert all(r["cost_usd"] == pytest.approx(r["sync_cost_usd"]) for r in rows)
        assert sum(r["cost_usd"] for r in rows) > 0
        entry = json.loads(Path(_local(handle["ledger_path"])).read_text())
        # The sync results JSONL stays the entry's results_path (a re-attached handle needs it).
        assert entry["results_path"] == handle["results_path"]
        assert entry["collected_path"] == path


def test_a_batch_a_user_canceled_collects_its_canceled_rows_as_user_canceled(
    tmp_path, emulator_factory, monkeypatch
):
    from anthropic_batch.cancel import cancel_by_user

    emu = emulator_factory("--processing-seconds", "60")
    conn_id = use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(4), per_chunk=10)
    (handle,) = submit_chunks(run, conn_id=conn_id)
    entry = {
        **json.loads(Path(_local(handle["ledger_path"])).read_text()),
        "ledger_path": handle["ledger_path"],
    }
    cancel_by_user(entry, "alice", conn_id=conn_id)
    wait_ended(AnthropicBatchHook(conn_id), handle["batch_id"])
    op = CollectResultsOperator(task_id="collect", handle=handle, work_dir=run.work_dir, conn_id=conn_id)
    rows = pq.read_table(_local(op.execute(make_context(task_id="batch.collect")))).to_pylist()
    assert rows and {r["status"] for r in rows} == {"canceled"}
    assert {(r["error_type"], r["error_message"]) for r in rows} == {("user_canceled", "canceled by alice")}
