"""The synchronous backend: crash-resume in parts (object store too) and taking over batches in flight."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from anthropic_batch import storage, sync_runner
from anthropic_batch.batch_requests import write_chunk
from anthropic_batch.collection import collect_batch
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger
from anthropic_batch.pricing import load_price_table
from anthropic_batch.submission import submit_idempotently
from tests.plugins.anthropic_batch._operator_context import (
    prepare_run,
    submit_chunks,
    ticket_records,
)
from tests.plugins.anthropic_batch._operator_context import use_emulator as use_default_conn
from tests.plugins.anthropic_batch.test_hooks import request_line, use_emulator

_REAL_CALL_ONE = sync_runner.call_one


class _Crash(BaseException):
    """A worker dying mid-chunk (BaseException: nothing in the code under test may catch it)."""


def _count_calls(monkeypatch, *, crash_after: int | None = None, on_crash=None) -> list[str]:
    """Wrap the real ``call_one`` to record every custom_id asked; optionally die after N answers."""
    asked: list[str] = []
    real = _REAL_CALL_ONE

    def counting(client, request):
        if crash_after is not None and len(asked) >= crash_after:
            if on_crash is not None:
                on_crash()
            raise _Crash()
        asked.append(request["custom_id"])
        return real(client, request)

    monkeypatch.setattr(sync_runner, "call_one", counting)
    return asked


def _memory_chunk(n: int) -> dict:
    """A chunk file on an object store (fsspec memory) and a fresh store behind it."""
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")
    attach(protocol="memory", fs=fs)
    path = "memory://bucket/pipe/work/date=2026-11-01/requests/chunk-00000.jsonl"
    info = write_chunk((request_line(f"r{i}", f"text {i}") for i in range(n)), path, 0)
    info["fs"] = fs
    return info


def _sync_kwargs(info: dict) -> dict:
    return {
        "chunk_path": info["path"],
        "chunk_fingerprint": info["fingerprint"],
        "n_requests": info["n_requests"],
        "n_bytes": info["n_bytes"],
        "dag_id": "dag",
        "task_id": "batch.submit",
        "run_id": "manual__1",
        "map_index": 0,
        "partition": "2026-11-01",
        "pipeline": "pipe",
        "attempt": 1,
        "model": "claude-haiku-4-5",
        "mode": "sync",
        "sync_concurrency": 1,
    }


def test_a_crash_on_an_object_store_resumes_from_the_parts_without_paying_again(
    emulator_factory, monkeypatch
):
    from anthropic_batch import sync_backend

    emu = emulator_factory("--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sync_parts")
    monkeypatch.setattr(sync_backend, "PART_EVERY_ANSWERS", 2)
    info = _memory_chunk(10)
    fs = info["fs"]
    ledger = SubmissionLedger("memory://bucket")
    # What storage holds at the moment the worker is killed (after 7 answers): nothing the dying
    # process does afterwards (closing files, flushing) reaches storage.
    at_crash: dict = {}
    asked = _count_calls(
        monkeypatch, crash_after=7, on_crash=lambda: at_crash.setdefault("store", dict(fs.store))
    )
    with pytest.raises(_Crash):
        submit_idempotently(AnthropicBatchHook(conn_id), ledger, **_sync_kwargs(info))
    fs.store.clear()
    fs.store.update(at_crash["store"])
    first = list(asked)
    assert len(first) == 7
    parts = [k for k in fs.store if "/sync/chunk-00000/part-" in k]
    assert len(parts) == 3  # 2 + 2 + 2 answers persisted, each part one atomic write

    asked_again = _count_calls(monkeypatch)
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **_sync_kwargs(info))
    # Only the 7th answer (in flight when the worker died, never persisted) and the 3 never asked.
    assert sorted(asked_again) == sorted({f"r{i}" for i in range(10)} - set(first[:6]))
    results = storage.as_path(handle["results_path"]).read_bytes().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in results) == sorted(f"r{i}" for i in range(10))
    assert handle["mode"] == "sync" and handle["sync_run_id"] == "sync_" + info["fingerprint"][:24]
    assert handle["batch_id"] is None  # a synchronous run is no batch
    assert not [k for k in fs.store if "/part-" in k]  # superseded by the final file


def _wait_until(moment: datetime) -> None:
    """Let the emulator's clock reach ``moment`` (its requests finish at seeded points in time)."""
    while datetime.now(UTC) < moment:
        time.sleep(0.05)


def _batch_half_done(tmp_path, emulator_factory, monkeypatch, *, cancel_seconds: str):
    """A nightly batch of 12 requests, about half answered; returns (records, run, hook, its handle)."""
    emu = emulator_factory("--processing-seconds", "4", "--cancel-seconds", cancel_seconds, "--seed", "5")
    use_default_conn(monkeypatch, emu)
    records = ticket_records(12)
    run = prepare_run(tmp_path, records, per_chunk=12)
    (batch_handle,) = submit_chunks(run)
    hook = AnthropicBatchHook()
    batch_id = batch_handle["batch_id"]
    _wait_until(hook.get_batch(batch_id).created_at + timedelta(seconds=2))
    return records, run, hook, batch_handle


def test_urgent_sync_rerun_takes_over_the_batch_in_flight(tmp_path, emulator_factory, monkeypatch):
    from anthropic_batch.sync_backend import TAKEOVER_FILE, takeover_summary

    records, run, hook, batch_handle = _batch_half_done(
        tmp_path, emulator_factory, monkeypatch, cancel_seconds="0.3"
    )
    batch_id = batch_handle["batch_id"]

    # The urgent rerun of the same date: same requests, mode=sync.
    rerun = prepare_run(tmp_path, records, per_chunk=12, mode="sync")
    asked = _count_calls(monkeypatch)
    (handle,) = submit_chunks(rerun)
    assert handle["mode"] == "sync" and handle["sync_run_id"].startswith("sync_")

    batch = hook.get_batch(batch_id)
    assert batch.processing_status == "ended"  # canceled, not waited for
    counts = batch.request_counts
    assert counts.succeeded > 0 and counts.canceled > 0 and counts.succeeded + counts.canceled == 12
    batch_lines = {json.loads(x)["custom_id"]: x for x in hook.iter_result_lines(batch_id)}
    answered = {cid for cid, x in batch_lines.items() if json.loads(x)["result"]["type"] == "succeeded"}
    # Only what the batch had not answered is sent, each once.
    assert sorted(asked) == sorted(set(batch_lines) - answered)

    results = Path(handle["results_path"].removeprefix("file://")).read_bytes().splitlines()
    by_id = {json.loads(x)["custom_id"]: x for x in results}
    assert len(results) == len(by_id) == 12
    assert all(by_id[cid] == batch_lines[cid] for cid in answered)  # the batch's answers, as they came

    ledger_entry = json.loads(Path(handle["ledger_path"].removeprefix("file://")).read_text())
    assert batch_id in ledger_entry["previous_batch_ids"] and ledger_entry["mode"] == "sync"
    assert ledger_entry["n_reused_from_batches"] == len(answered) and ledger_entry["n_paid_twice"] == 0
    takeover = json.loads(
        (Path(run.work_dir.removeprefix("file://")) / "sync" / "chunk-00000" / TAKEOVER_FILE).read_text()
    )["takeovers"]
    assert [t["batch_id"] for t in takeover] == [batch_id] and takeover[0]["canceled_by_takeover"]
    assert takeover_summary(run.work_dir) == {
        "batch_ids": [batch_id],
        "n_reused_answers": len(answered),
        "n_paid_twice": 0,
        "paid_twice_custom_ids": [],
        "unresolved_batch_ids": [],
    }

    # Collected like any sync chunk; the reused answers cost the batch price they were billed at.
    stats = collect_batch(hook, handle, run.work_dir)
    rows = pq.read_table(stats["results_path"].removeprefix("file://")).to_pylist()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"succeeded"}
    discount = float(load_price_table().batch_discount)
    for row in rows:
        expected = row["sync_cost_usd"] * (discount if row["custom_id"] in answered else 1.0)
        assert row["cost_usd"] == pytest.approx(expected)
    assert stats["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))

    # The nightly run, still going, collects its canceled batch: the ledger keeps the sync run.
    entry_before = json.loads(Path(handle["ledger_path"].removeprefix("file://")).read_text())
    old = collect_batch(hook, batch_handle, run.work_dir)
    assert json.loads(Path(handle["ledger_path"].removeprefix("file://")).read_text()) == entry_before
    # ...and its canceled requests are final there: the sync run answers them, so that run's
    # resubmit must not pay for them a second time.
    old_rows = pq.read_table(old["results_path"].removeprefix("file://")).to_pylist()
    canceled = [r for r in old_rows if r["status"] == "canceled"]
    assert canceled and all(r["error_type"] == "user_canceled" for r in canceled)
    assert all("synchronous rerun" in r["error_message"] for r in canceled)

    # Running the sync submit again re-attaches: nothing is asked or canceled again.
    asked.clear()
    (again,) = submit_chunks(rerun)
    assert again == handle and asked == []


def test_requests_the_cancel_could_not_stop_are_reported_as_paid_twice(
    tmp_path, emulator_factory, monkeypatch
):
    from anthropic_batch import sync_backend

    records, run, hook, batch_handle = _batch_half_done(
        tmp_path, emulator_factory, monkeypatch, cancel_seconds="1.5"
    )
    batch_id = batch_handle["batch_id"]
    # The cancellation takes longer than the urgent run is willing to wait.
    monkeypatch.setattr(sync_backend, "CANCEL_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(sync_backend, "OVERLAP_WAIT_SECONDS", 30.0)
    rerun = prepare_run(tmp_path, records, per_chunk=12, mode="sync")
    asked = _count_calls(monkeypatch)
    (handle,) = submit_chunks(rerun)
    # nothing known yet: all sent now
    assert sorted(c.rsplit("-", 1)[0] for c in asked) == sorted(r["ticket_id"] for r in records)

    batch = hook.get_batch(batch_id)
    succeeded = sorted(
        json.loads(x)["custom_id"]
        for x in hook.iter_result_lines(batch_id)
        if json.loads(x)["result"]["type"] == "succeeded"
    )
    assert batch.request_counts.succeeded == len(succeeded) > 0
    summary = sync_backend.takeover_summary(run.work_dir)
    assert summary["n_paid_twice"] == len(succeeded) and summary["paid_twice_custom_ids"] == succeeded
    assert summary["n_reused_answers"] == 0 and summary["unresolved_batch_ids"] == []
    entry = json.loads(Path(handle["ledger_path"].removeprefix("file://")).read_text())
    assert entry["n_paid_twice"] == len(succeeded)


def test_publish_summary_reports_the_takeover(tmp_path):
    """The summary block comes from the takeover records alone (no API needed)."""
    from anthropic_batch.sync_backend import TAKEOVER_FILE, takeover_summary

    work = tmp_path / "work"
    assert takeover_summary(str(work)) is None
    for chunk, record in (
        ("chunk-00000", {"batch_id": "b0", "n_reused": 3, "n_paid_twice": 1, "paid_twice_custom_ids": ["x"]}),
        ("chunk-00001", {"batch_id": "b1", "n_reused": 2, "n_paid_twice": 0, "unresolved": True}),
    ):
        storage.atomic_write_json(work / "sync" / chunk / TAKEOVER_FILE, {"takeovers": [record]})
    assert takeover_summary(str(work)) == {
        "batch_ids": ["b0", "b1"],
        "n_reused_answers": 5,
        "n_paid_twice": 1,
        "paid_twice_custom_ids": ["x"],
        "unresolved_batch_ids": ["b1"],
    }


def test_changed_requests_under_the_same_chunk_index_are_asked_again(tmp_path, emulator_factory, monkeypatch):
    """Answers on storage belong to the requests they answered: a new version of the chunk pays again."""
    emu = emulator_factory("--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sync_versions")
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = tmp_path / "work" / "requests" / "chunk-00000.jsonl"
    path.parent.mkdir(parents=True)
    first = write_chunk((request_line(f"r{i}", f"text {i}") for i in range(3)), str(path), 0)
    submit_idempotently(AnthropicBatchHook(conn_id), ledger, **_sync_kwargs(first))
    second = write_chunk((request_line(f"r{i}", f"other text {i}") for i in range(3)), str(path), 0)
    asked = _count_calls(monkeypatch)
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **_sync_kwargs(second))
    assert sorted(asked) == ["r0", "r1", "r2"]
    assert handle["sync_run_id"] == "sync_" + second["fingerprint"][:24]
