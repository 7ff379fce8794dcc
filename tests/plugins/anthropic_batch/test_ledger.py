"""The submission ledger (persistence only): entries, files, compare-and-swap, new intents."""

from __future__ import annotations

from pathlib import Path

import pytest

from anthropic_batch.ledger import (
    LedgerState,
    SubmissionLedger,
    intent_fields,
    is_fully_canceled,
    ledger_root_for,
    new_intent,
    sync_results_path,
    update_entry,
)


def test_is_fully_canceled():
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 3, "expired": 0}
    assert is_fully_canceled({"processing_status": "ended", "request_counts": counts})
    assert not is_fully_canceled({"processing_status": "canceling", "request_counts": counts})
    assert not is_fully_canceled(
        {"processing_status": "ended", "request_counts": {**counts, "succeeded": 1, "canceled": 2}}
    )


def test_sync_results_path():
    assert str(sync_results_path("file:///w/requests/chunk-00003.jsonl")).endswith(
        "/w/sync/chunk-00003.results.jsonl"
    )


def test_ledger_files_round_trip(tmp_path):
    ledger = SubmissionLedger(str(tmp_path))
    path = ledger.entry_path("d", "2026-11-01", "t", "f" * 64)
    assert str(path).endswith(f"_ledger/d/2026-11-01/t/{'f' * 64}.json")
    assert ledger.read(path) is None
    ledger.write(path, {"state": "intent", "batch_id": None})
    assert update_entry(path, state="submitted", batch_id="msgbatch_x")["batch_id"] == "msgbatch_x"
    entries = list(ledger.iter_entries())
    assert [(e["batch_id"], e["ledger_path"]) for e in entries] == [("msgbatch_x", str(path))]
    assert ledger.known_batch_ids(partition="2026-11-01") == {"msgbatch_x"}
    assert not any(".tmp-" in p.name for p in Path(tmp_path).rglob("*"))
    with pytest.raises(FileNotFoundError):
        update_entry(ledger.entry_path("d", "p", "t", "missing"), state="x")


def test_ledger_root_for(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BATCH_STORAGE_ROOT", str(tmp_path / "configured"))
    work = tmp_path / "root" / "pipe" / "work" / "date=2026-11-01"
    assert str(ledger_root_for(str(work))) == (tmp_path / "root").as_uri()
    assert str(ledger_root_for(str(work), str(tmp_path / "given"))) == (tmp_path / "given").as_uri()
    assert str(ledger_root_for(str(tmp_path / "elsewhere"))) == (tmp_path / "configured").as_uri()


def test_new_intent_and_the_sync_intent_share_their_fields():
    ident = {"dag_id": "d", "partition": "2026-11-01", "task_id": "t", "chunk_fingerprint": "f" * 64}
    claim = new_intent(**ident, mode="batch")
    fresh = intent_fields(**ident, mode="sync", previous_batch_ids=["msgbatch_a"])
    assert claim["ledger_key"] == fresh["ledger_key"] == f"d/2026-11-01/t/{'f' * 64}"
    assert claim["state"] == fresh["state"] == LedgerState.INTENT
    assert (claim["generation"], claim["create_started_at"], claim["previous_batch_ids"]) == (1, None, [])
    assert claim["heartbeat_at"] == claim["intent_at"]
    # merged into an owned entry by the sync backend: it must not reset the claim's fields
    assert not {"generation", "heartbeat_at", "create_started_at", "owner"} & fresh.keys()
    assert fresh["previous_batch_ids"] == ["msgbatch_a"]
