"""The submission contracts (contracts.py): BatchHandle over XCom, LedgerEntry on storage, and the
older shapes (a sync run named by a fake ``sync_`` batch id, ledger files without newer fields)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from anthropic_batch.contracts import BatchHandle, LedgerEntry, LedgerEntryError, sync_run_id_for
from anthropic_batch.ledger import (
    SubmissionLedger,
    cas_update,
    decode_entry,
    encode_entry,
    handle_from_entry,
    new_intent,
    update_entry,
)
from anthropic_batch.links import AnthropicConsoleBatchLink
from anthropic_batch.status import RunMode
from anthropic_batch.submission import submit_idempotently

FINGERPRINT = "ab" * 32
TI_KEY = SimpleNamespace(dag_id="d", task_id="t", run_id="r", map_index=0, try_number=1)


def _batch_handle() -> BatchHandle:
    return BatchHandle(
        batch_id="msgbatch_01",
        chunk_path="file:///w/requests/chunk-00000.jsonl",
        ledger_path="file:///root/_ledger/d/p/t/x.json",
        attempt=2,
        n_requests=5,
    )


def _sync_handle() -> BatchHandle:
    return BatchHandle(
        mode=RunMode.SYNC,
        sync_run_id=sync_run_id_for(FINGERPRINT),
        chunk_path="file:///w/requests/chunk-00000.jsonl",
        ledger_path="file:///root/_ledger/d/p/t/x.json",
        results_path="file:///w/sync/chunk-00000.results.jsonl",
        n_requests=5,
    )


@pytest.mark.parametrize("make", [_batch_handle, _sync_handle])
def test_handle_round_trips_through_xcom_json(make):
    handle = make()
    value = json.loads(json.dumps(handle.to_xcom()))  # what XCom stores
    assert BatchHandle.model_validate(value) == handle
    fields = {"batch_id", "chunk_path", "ledger_path", "mode", "attempt", "results_path", "n_requests"}
    assert set(value) >= fields  # the field names older readers use


def test_sync_handle_names_no_batch():
    handle = _sync_handle()
    assert handle.batch_id is None and handle.is_sync
    assert handle.run_id == "sync_" + FINGERPRINT[:24]  # names its results file, as before
    with pytest.raises(ValidationError, match="batch_id"):
        BatchHandle(chunk_path="c", n_requests=1)  # a batch handle without a batch
    with pytest.raises(ValidationError, match="sync_run_id"):
        BatchHandle(mode=RunMode.SYNC, chunk_path="c")


def test_old_sync_handle_shape_is_read_as_a_sync_run():
    old = {  # the XCom of a sync submit before sync runs had their own field
        "batch_id": "sync_abc",
        "chunk_path": "file:///x/requests/chunk-00000.jsonl",
        "ledger_path": "/nope.json",
        "mode": "sync",
        "attempt": 1,
        "results_path": "file:///x/sync/chunk-00000.results.jsonl",
        "n_requests": 2,
    }
    handle = BatchHandle.of(old)
    assert handle.is_sync and handle.batch_id is None and handle.sync_run_id == "sync_abc"
    assert handle.run_id == "sync_abc"


@pytest.mark.parametrize("value", [_sync_handle().to_xcom(), {"batch_id": "sync_abc", "mode": "sync"}])
def test_no_console_link_for_a_sync_run_by_mode(value):
    operator = SimpleNamespace(handle=value)
    assert AnthropicConsoleBatchLink().get_link(operator, ti_key=TI_KEY) == ""
    batch = SimpleNamespace(handle=_batch_handle().to_xcom())
    assert AnthropicConsoleBatchLink().get_link(batch, ti_key=TI_KEY).endswith("/batches/msgbatch_01")


def test_ledger_entry_round_trip(tmp_path):
    entry = new_intent(
        dag_id="d", task_id="t", partition="p", chunk_fingerprint=FINGERPRINT, chunk_path="c",
        n_requests=3, n_bytes=10, model="m", mode="batch", owner="o", lease_seconds=60.0,
    )  # fmt: skip
    assert decode_entry(encode_entry(entry), "x.json") == entry
    model = LedgerEntry.parse(entry, "x.json")
    assert model.state == "intent" and model.recorded_id is None


def _write(path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))


def test_old_ledger_file_without_newer_fields_loads_unchanged(tmp_path):
    ledger = SubmissionLedger(str(tmp_path))
    path = ledger.entry_path("d", "p", "t", FINGERPRINT)
    old = {  # no owner/heartbeat/create_started_at/sync_run_id; a field this version does not know
        "dag_id": "d",
        "state": "submitted",
        "batch_id": "msgbatch_old",
        "chunk_path": "file:///w/requests/chunk-00000.jsonl",
        "n_requests": 4,
        "mode": "batch",
        "written_by_hand": "yes",
    }
    _write(path, old)
    assert ledger.read(path) == old  # no field added: "create_started_at" absent still means something
    handle = handle_from_entry(ledger.read(path), path)
    assert handle.batch_id == "msgbatch_old" and handle.mode == RunMode.BATCH and handle.attempt == 1
    after = update_entry(path, processing_status="ended")
    assert after["written_by_hand"] == "yes" and "create_started_at" not in after
    assert json.loads(path.read_text())["processing_status"] == "ended"


def test_old_sync_ledger_entry_is_read_as_a_sync_run_and_reattached(tmp_path):
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("d", "p", "t", FINGERPRINT)
    chunk = "file:///w/requests/chunk-00000.jsonl"
    _write(
        path,
        {  # what sync_backend wrote before: the run as an ended pseudo-batch
            "dag_id": "d", "task_id": "t", "partition": "p", "chunk_fingerprint": FINGERPRINT,
            "state": "ended", "mode": "sync", "batch_id": "sync_" + FINGERPRINT[:24],
            "chunk_path": chunk, "n_requests": 3, "attempt": 1,
            "results_path": "file:///w/sync/chunk-00000.results.jsonl", "processing_status": "ended",
        },
    )  # fmt: skip
    entry = ledger.read(path)
    assert entry["batch_id"] is None and entry["sync_run_id"] == "sync_" + FINGERPRINT[:24]
    assert ledger.known_batch_ids() == set()  # a sync run is no batch
    # A rerun re-attaches to the recorded sync run: nothing is sent (no hook is needed).
    handle = submit_idempotently(
        None,  # type: ignore[arg-type]
        ledger,
        chunk_path=chunk, chunk_fingerprint=FINGERPRINT, n_requests=3, n_bytes=30, dag_id="d",
        task_id="t", run_id="r2", map_index=-1, partition="p", pipeline="x", attempt=1, model="m",
        mode="sync",
    )  # fmt: skip
    assert handle["mode"] == "sync" and handle["batch_id"] is None
    assert handle["sync_run_id"] == "sync_" + FINGERPRINT[:24]
    assert handle["results_path"] == "file:///w/sync/chunk-00000.results.jsonl"


def test_bad_entry_names_the_file_and_the_field(tmp_path, caplog):
    ledger = SubmissionLedger(str(tmp_path))
    path = ledger.entry_path("d", "p", "t", FINGERPRINT)
    _write(path, {"batch_id": "msgbatch_x", "n_requests": "many", "chunk_path": "c"})
    with pytest.raises(LedgerEntryError) as err:
        ledger.read(path)
    assert str(path) in str(err.value) and "n_requests" in str(err.value)
    with pytest.raises(LedgerEntryError, match="n_requests"):
        cas_update(path, lambda e: {**e, "state": "ended"})
    # Listing skips it with a warning naming the file, as it does an unreadable file.
    with caplog.at_level(logging.WARNING, logger="anthropic_batch.ledger"):
        assert list(ledger.iter_entries()) == []
    assert str(path) in caplog.text and "n_requests" in caplog.text
    # Nothing invalid is written either.
    with pytest.raises(LedgerEntryError, match="generation"):
        encode_entry({"generation": "two"}, path)
