"""A batch is only ever claimed by the chunk that created it (issue 9, item 2)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from anthropic_batch import ledger as ledger_module
from anthropic_batch import submission as submission_module
from anthropic_batch.collection import collect_batch
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger, rfc3339
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.operators.submit import SubmitBatchOperator
from anthropic_batch.submission import submit_idempotently
from tests.plugins.anthropic_batch._operator_context import (
    INCLUDE_DIR,
    MODEL,
    make_context,
    ticket_records,
    use_emulator,
    wait_ended,
)
from tests.plugins.anthropic_batch.test_hooks import sdk_client

D1, D2 = "2026-11-01", "2026-11-02"


def prepare_date(tmp_path: Path, root: Path, partition: str, records: list[dict[str, Any]]) -> str:
    """The real prepare of one date under ``root``; returns its work_dir."""
    source = tmp_path / f"tickets-{partition}-{root.name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    work_dir = f"file://{root}/tickets/work/date={partition}"
    PrepareRequestsOperator(
        task_id="prepare",
        source=str(source),
        key_columns=["ticket_id"],
        prompt_template="prompts/support_ticket.j2",
        model=MODEL,
        max_tokens=256,
        include_dir=str(INCLUDE_DIR),
        work_dir=work_dir,
        pipeline="tickets",
        partition=partition,
        max_requests_per_chunk=100,
    ).execute(make_context(task_id="prepare", partition=partition))
    return work_dir


def manifest_chunk(work_dir: str) -> dict[str, Any]:
    manifest = json.loads(Path(work_dir.removeprefix("file://"), "requests", "manifest.json").read_text())
    (chunk,) = manifest["chunks"]
    return chunk


def submit_date(work_dir: str, partition: str) -> dict[str, Any]:
    chunk = manifest_chunk(work_dir)
    op = SubmitBatchOperator(task_id="submit", chunk_path=chunk["path"], work_dir=work_dir)
    return op.execute(make_context(task_id="batch.submit", map_index=0, partition=partition))


def die_at_intent(root: Path, work_dir: str, partition: str, intent_at: datetime | None = None) -> Path:
    """What a submit that died right after writing its intent leaves in the ledger."""
    chunk = manifest_chunk(work_dir)
    ledger = SubmissionLedger(f"file://{root}")
    path = ledger.entry_path("test_dag", partition, "batch.submit", chunk["fingerprint"])
    ledger.write(
        path,
        {
            "dag_id": "test_dag",
            "task_id": "batch.submit",
            "partition": partition,
            "pipeline": "tickets",
            "chunk_path": chunk["path"],
            "chunk_fingerprint": chunk["fingerprint"],
            "n_requests": chunk["n_requests"],
            "mode": "batch",
            "attempt": 1,
            "state": "intent",
            "intent_at": rfc3339(intent_at or datetime.now(UTC)),
            "batch_id": None,
        },
    )
    return Path(str(path).removeprefix("file://"))


def edited(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same keys, same count, other text: what the next date of a daily ticket export looks like."""
    return [{**r, "body": r["body"] + " (updated the next day)"} for r in records]


@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    use_emulator(monkeypatch, emu)
    return emu


def test_rerun_of_a_dead_date_does_not_take_the_next_dates_batch(emu, tmp_path):
    """The issue's scenario: D1's submit dies at its intent; D2 (same keys, edited text, same
    request count) runs; the rerun of D1 must get its own batch, and publish D1's answers."""
    root = tmp_path / "root"
    d1 = prepare_date(tmp_path, root, D1, ticket_records(5))
    d2 = prepare_date(tmp_path, root, D2, edited(ticket_records(5)))
    die_at_intent(root, d1, D1)
    d2_handle = submit_date(d2, D2)

    d1_handle = submit_date(d1, D1)
    assert d1_handle["batch_id"] != d2_handle["batch_id"]
    assert len(list(sdk_client(emu).messages.batches.list(limit=100))) == 2
    wait_ended(AnthropicBatchHook(), d1_handle["batch_id"])
    result = collect_batch(AnthropicBatchHook(), d1_handle, d1)
    rows = pq.read_table(result["results_path"].removeprefix("file://")).to_pylist()
    keys = pq.read_table(Path(d1.removeprefix("file://"), "requests", "keys.parquet")).to_pylist()
    assert {(r["custom_id"], r["request_fingerprint"]) for r in rows} == {
        (k["custom_id"], k["request_fingerprint"]) for k in keys
    }


def test_an_unrecorded_ended_batch_of_other_requests_is_verified_and_not_taken(emu, tmp_path):
    """D2 ran elsewhere (another storage root: not in this ledger). Its batch has ended, so its
    results show at once that it answers other requests: D1 submits its own."""
    d1_root, d2_root = tmp_path / "root", tmp_path / "elsewhere"
    d1 = prepare_date(tmp_path, d1_root, D1, ticket_records(4))
    d2 = prepare_date(tmp_path, d2_root, D2, edited(ticket_records(4)))
    intent = die_at_intent(d1_root, d1, D1)
    d2_handle = submit_date(d2, D2)
    wait_ended(AnthropicBatchHook(), d2_handle["batch_id"])

    d1_handle = submit_date(d1, D1)
    assert d1_handle["batch_id"] != d2_handle["batch_id"]
    assert json.loads(intent.read_text())["foreign_batch_ids"] == [d2_handle["batch_id"]]


def test_an_unverifiable_running_batch_is_never_published(emulator_factory, monkeypatch, tmp_path):
    """Still running, the other batch cannot be verified and is attached provisionally; collect
    verifies it before writing anything, refuses it, and the chunk is then submitted anew."""
    from anthropic_batch.submission import ForeignBatchError

    emu = emulator_factory("--processing-seconds", "3")
    use_emulator(monkeypatch, emu)
    d1_root, d2_root = tmp_path / "root", tmp_path / "elsewhere"
    d1 = prepare_date(tmp_path, d1_root, D1, ticket_records(4))
    d2 = prepare_date(tmp_path, d2_root, D2, edited(ticket_records(4)))
    intent = die_at_intent(d1_root, d1, D1)
    d2_handle = submit_date(d2, D2)

    provisional = submit_date(d1, D1)  # the listing cannot tell yet: same count, unrecorded, running
    assert provisional["batch_id"] == d2_handle["batch_id"]
    assert json.loads(intent.read_text())["identity_verified"] is False
    wait_ended(AnthropicBatchHook(), provisional["batch_id"])
    with pytest.raises(ForeignBatchError) as err:
        collect_batch(AnthropicBatchHook(), provisional, d1)
    assert str(intent) in str(err.value) and "submit the chunk anew" in str(err.value)
    results = Path(d1.removeprefix("file://"), "results")
    assert not results.exists() or not list(results.rglob("attempt-*/*.parquet"))  # nothing of D2 is stored
    assert json.loads(intent.read_text())["batch_id"] is None

    again = submit_date(d1, D1)  # the cleared submit task
    assert again["batch_id"] != d2_handle["batch_id"]
    wait_ended(AnthropicBatchHook(), again["batch_id"])
    result = collect_batch(AnthropicBatchHook(), again, d1)
    assert result["counts_by_status"] == {"succeeded": 4}


def test_a_worker_clock_minutes_fast_still_finds_its_orphan(emu, tmp_path, monkeypatch):
    """Worker clocks 5 minutes ahead of the API: the orphan of a dead submit is still found."""
    root = tmp_path / "root"
    d1 = prepare_date(tmp_path, root, D1, ticket_records(3))
    fast = timedelta(minutes=5)
    intent = die_at_intent(root, d1, D1, intent_at=datetime.now(UTC) + fast)
    orphan = AnthropicBatchHook().create_batch_from_chunk(
        manifest_chunk(d1)["path"]
    )  # what the dead worker sent
    for module in (ledger_module, submission_module):  # the intent and the create fence
        monkeypatch.setattr(module, "utc_now", lambda: datetime.now(UTC) + fast)

    handle = submit_date(d1, D1)
    assert handle["batch_id"] == orphan.id
    assert [b.id for b in sdk_client(emu).messages.batches.list(limit=100)] == [orphan.id]
    assert json.loads(intent.read_text())["recovered"] is True


def test_recovery_ignores_batches_recorded_by_any_ledger_entry(emu, tmp_path):
    """Another pipeline's entry, another date, another task: all are excluded from orphan search."""
    root = tmp_path / "root"
    d1 = prepare_date(tmp_path, root, D1, ticket_records(2))
    die_at_intent(root, d1, D1)
    other = AnthropicBatchHook().create_batch_from_chunk(manifest_chunk(d1)["path"])  # identical requests
    ledger = SubmissionLedger(f"file://{root}")
    ledger.write(
        ledger.entry_path("other_dag", "2025-01-01", "other.submit", "f" * 64),
        {"state": "submitted", "batch_id": other.id, "partition": "2025-01-01"},
    )
    handle = submit_idempotently(
        AnthropicBatchHook(),
        ledger,
        chunk_path=manifest_chunk(d1)["path"],
        chunk_fingerprint=manifest_chunk(d1)["fingerprint"],
        n_requests=2,
        n_bytes=manifest_chunk(d1)["n_bytes"],
        dag_id="test_dag",
        task_id="batch.submit",
        run_id="manual__2",
        map_index=0,
        partition=D1,
        pipeline="tickets",
        attempt=1,
        model=MODEL,
        mode="batch",
        orphan_settle_seconds=0,
    )
    assert handle["batch_id"] != other.id
