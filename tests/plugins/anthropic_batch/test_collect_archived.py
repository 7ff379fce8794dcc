"""Stored results are the source of truth: a rerun after the API archived a batch (29 days)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from anthropic_batch.operators.publish import PublishPartitionOperator
from anthropic_batch.partition import published_dir
from tests.plugins.anthropic_batch._operator_context import (
    make_context,
    prepare_run,
    submit_chunks,
    ticket_records,
    use_emulator,
)
from tests.plugins.anthropic_batch.test_hooks import sdk_client
from tests.plugins.anthropic_batch.test_resubmit import _collect_all, _operator_factory, run_with_deferrals

#: Emulated seconds per real second: 24 h expiry after 0.29 s, 29-day archive after 8.4 s.
TIME_SCALE = "300000"


def wait_archived(emu, batch_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sdk_client(emu).messages.batches.retrieve(batch_id).archived_at is None:
        assert time.monotonic() < deadline, f"batch {batch_id} was not archived within {timeout}s"
        time.sleep(0.2)


def _run_to_publish(run, tmp_path: Path) -> dict:
    paths = _collect_all(run, submit_chunks(run))
    merged_path, _ = run_with_deferrals(_operator_factory(run, paths), make_context(task_id="resubmit"))
    target = run.root / "tickets" / "extractions" / "date=2026-11-01"
    summary = PublishPartitionOperator(
        task_id="publish",
        work_dir=run.work_dir,
        merged_path=merged_path,
        extraction_dir=f"file://{target}",
        pipeline="tickets",
    ).execute(make_context(task_id="publish"))
    data = pq.read_table(published_dir(target).path + "/data.parquet")
    return {"paths": paths, "summary": summary, "data": data}


def test_rerun_after_the_batch_was_archived_publishes_from_storage(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "0.1", "--time-scale", TIME_SCALE)
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(6), per_chunk=10)
    first = _run_to_publish(run, tmp_path)
    (batch,) = sdk_client(emu).messages.batches.list(limit=100)
    assert batch.request_counts.succeeded == 6
    wait_archived(emu, batch.id)

    again = _run_to_publish(run, tmp_path)  # the whole date again: submit, collect, resubmit, publish
    assert again["paths"] == first["paths"]
    assert [b.id for b in sdk_client(emu).messages.batches.list(limit=100)] == [batch.id]  # nothing created
    assert again["data"].sort_by("custom_id").to_pylist() == first["data"].sort_by("custom_id").to_pylist()
    assert again["summary"]["counts_by_status"] == {"succeeded": 6}


def test_archived_batch_without_its_collected_file_fails_naming_both(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "0.1", "--time-scale", TIME_SCALE)
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(3), per_chunk=10)
    (path,) = _collect_all(run, handles := submit_chunks(run))
    batch_id = handles[0]["batch_id"]
    wait_archived(emu, batch_id)
    Path(path.removeprefix("file://")).unlink()  # the collected file is lost

    with pytest.raises(Exception, match="archived") as err:
        _collect_all(run, submit_chunks(run))
    message = str(err.value)
    assert batch_id in message and path in message
    assert handles[0]["ledger_path"] in message  # what to delete to pay again, if that is the choice
    assert len(list(sdk_client(emu).messages.batches.list(limit=100))) == 1
    ledger = json.loads(Path(handles[0]["ledger_path"].removeprefix("file://")).read_text())
    assert ledger["batch_id"] == batch_id  # nothing was reset or resubmitted behind the user's back
