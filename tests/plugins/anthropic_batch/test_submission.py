"""Submission policy: pure helpers, and idempotent submission against the emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import anthropic
import pytest

from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import LedgerState, SubmissionLedger, rfc3339
from anthropic_batch.submission import AmbiguousSubmissionError, resolve_orphans, submit_idempotently
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator, wait_ended

REPO = Path(__file__).resolve().parents[3]


def submit_kwargs(info: dict, **overrides) -> dict:
    kwargs = {
        "chunk_path": info["path"],
        "chunk_fingerprint": info["fingerprint"],
        "n_requests": info["n_requests"],
        "n_bytes": info["n_bytes"],
        "dag_id": "dag",
        "task_id": "submit",
        "run_id": "manual__1",
        "map_index": info["index"],
        "partition": "2026-11-01",
        "pipeline": "pipe",
        "attempt": 1,
        "model": "claude-haiku-4-5",
        "mode": "batch",
        "orphan_settle_seconds": 0,
        "lease_seconds": 1.0,
    }
    kwargs.update(overrides)
    return kwargs


def listed(emu) -> list:
    return list(sdk_client(emu).messages.batches.list(limit=1000))


def write_intent(ledger: SubmissionLedger, info: dict, intent_at: datetime | None = None, **extra) -> Path:
    """The ledger state a worker leaves when it dies after writing the intent, before the batch id."""
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    ledger.write(
        path,
        {
            "dag_id": "dag",
            "task_id": "submit",
            "partition": "2026-11-01",
            "chunk_path": info["path"],
            "chunk_fingerprint": info["fingerprint"],
            "n_requests": info["n_requests"],
            "mode": "batch",
            "attempt": 1,
            "state": "intent",
            "intent_at": rfc3339(intent_at or datetime.now(UTC)),
            "batch_id": None,
            **extra,
        },
    )
    return path


# -- pure policy ---------------------------------------------------------------------------------
def test_resolve_orphans_drops_batches_other_entries_claimed():
    a, b = SimpleNamespace(id="msgbatch_a"), SimpleNamespace(id="msgbatch_b")
    assert resolve_orphans([a, b], {"msgbatch_a"}) == [b]
    assert resolve_orphans([a, b], set()) == [a, b]


# -- against the emulator ------------------------------------------------------------------------
@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    emu.conn_id = use_emulator(monkeypatch, emu, "ledger_emu")
    return emu


def test_submit_twice_creates_one_batch(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 5)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    first = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info))
    second = submit_idempotently(
        AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info, run_id="manual__2")
    )
    assert first == second
    assert [b.id for b in listed(emu)] == [first["batch_id"]]
    entry = ledger.read(first["ledger_path"])
    assert entry["state"] == LedgerState.SUBMITTED
    assert entry["intent_at"] <= entry["submitted_at"]
    assert first["mode"] == "batch" and first["n_requests"] == 5 and first["results_path"] is None


def test_intent_is_written_before_the_api_call(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    seen = {}

    def create():
        seen["entry"] = ledger.read(ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"]))
        return AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info), submit=create)
    assert seen["entry"]["state"] == "intent" and seen["entry"]["batch_id"] is None


def test_crash_between_intent_and_batch_id_reattaches(emu, tmp_path):
    """The dead worker wrote its intent and its create reached the API; the retry must re-attach."""
    info = make_chunk(tmp_path / "work", 4)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = write_intent(ledger, info)
    orphan = AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(
        info["path"]
    )  # what the dead worker sent
    handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info))
    assert handle["batch_id"] == orphan.id
    assert [b.id for b in listed(emu)] == [orphan.id]
    assert ledger.read(path)["recovered"] is True


def test_sigkilled_submit_is_recovered_by_the_retry(emu, tmp_path):
    """A real worker process is SIGKILLed right after its create reached the emulator."""
    info = make_chunk(tmp_path / "work", 6)
    root = tmp_path / "root"
    script = f"""
import os, signal, sys
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger
from anthropic_batch.submission import submit_idempotently
hook = AnthropicBatchHook({emu.conn_id!r})
def create_then_die():
    hook.create_batch_from_chunk({info["path"]!r})
    os.kill(os.getpid(), signal.SIGKILL)
submit_idempotently(hook, SubmissionLedger({str(root)!r}), submit=create_then_die, **{submit_kwargs(info)!r})
"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include"), str(REPO)]),
    }
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ledger = SubmissionLedger(str(root))
    entry = ledger.read(ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"]))
    assert entry["state"] == "intent" and entry["batch_id"] is None
    assert len(listed(emu)) == 1

    handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info))
    batches = listed(emu)
    assert [b.id for b in batches] == [handle["batch_id"]]


def test_ambiguous_create_is_recovered_not_resent(emulator_factory, monkeypatch, tmp_path):
    # Every create takes effect and then answers 500: the answer is lost, the batch exists.
    emu = emulator_factory("--http-fault", "create_after:500:1.0", "--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "ledger_lossy")
    info = make_chunk(tmp_path / "work", 5)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info))
    assert [b.id for b in listed(emu)] == [handle["batch_id"]]
    entry = ledger.read(handle["ledger_path"])
    assert entry["state"] == "submitted" and entry["recovered"] is True


def test_intent_without_batch_submits(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    write_intent(ledger, info, intent_at=datetime.now(UTC) - timedelta(minutes=10))
    handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(info))
    assert [b.id for b in listed(emu)] == [handle["batch_id"]]


def test_ambiguous_orphans_fail_loudly_without_submitting(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = write_intent(ledger, info)
    hook = AnthropicBatchHook(emu.conn_id)
    hook.create_batch_from_chunk(info["path"])
    hook.create_batch_from_chunk(make_chunk(tmp_path / "other", 3, prefix="o")["path"])
    with pytest.raises(AmbiguousSubmissionError) as err:
        submit_idempotently(hook, ledger, **submit_kwargs(info))
    message = str(err.value)
    assert str(path) in message and "delete that file" in message and "batch_id" in message
    assert len(listed(emu)) == 2  # nothing new was submitted
    assert ledger.read(path)["state"] == "intent"


def test_orphan_claimed_by_another_entry_is_not_taken(emu, tmp_path):
    ledger = SubmissionLedger(str(tmp_path / "root"))
    sibling = make_chunk(tmp_path / "a", 3, prefix="s")
    sibling_handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(sibling))
    mine = make_chunk(tmp_path / "b", 3, prefix="m")
    write_intent(ledger, mine, intent_at=datetime.now(UTC) - timedelta(seconds=30))
    handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **submit_kwargs(mine))
    assert handle["batch_id"] != sibling_handle["batch_id"]
    assert len(listed(emu)) == 2


def test_fully_canceled_batch_is_replaced_on_retry(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    hook = AnthropicBatchHook(emu.conn_id)
    first = submit_idempotently(hook, ledger, **submit_kwargs(info))
    hook.cancel_batch(first["batch_id"])
    assert wait_ended(sdk_client(emu), first["batch_id"]).request_counts.canceled == 2
    second = submit_idempotently(hook, ledger, **submit_kwargs(info))
    assert second["batch_id"] != first["batch_id"]
    assert ledger.read(second["ledger_path"])["previous_batch_ids"] == [first["batch_id"]]
    # ...and that replacement is itself idempotent.
    assert submit_idempotently(hook, ledger, **submit_kwargs(info)) == second
    assert len(listed(emu)) == 2


def test_a_batch_a_user_canceled_is_not_submitted_again(emu, tmp_path):
    from anthropic_batch.cancel import cancel_by_user

    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    hook = AnthropicBatchHook(emu.conn_id)
    first = submit_idempotently(hook, ledger, **submit_kwargs(info))
    entry = {**ledger.read(first["ledger_path"]), "ledger_path": first["ledger_path"]}
    cancel_by_user(entry, "alice", conn_id=emu.conn_id)
    assert wait_ended(sdk_client(emu), first["batch_id"]).request_counts.canceled == 2
    # A retry or clear re-attaches: the user decided not to pay for these requests.
    again = submit_idempotently(hook, ledger, **submit_kwargs(info))
    assert again["batch_id"] == first["batch_id"]
    assert len(listed(emu)) == 1


def test_sync_mode_writes_results_and_never_pays_twice(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sync_emu")
    info = make_chunk(tmp_path / "work", 6)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, mode="sync"))
    assert handle["mode"] == "sync"
    assert handle["sync_run_id"] == "sync_" + info["fingerprint"][:24] and handle["batch_id"] is None
    results = Path(handle["results_path"].removeprefix("file://"))
    assert results == tmp_path / "work" / "sync" / "chunk-00000.results.jsonl"
    lines = results.read_bytes().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(f"r{i}" for i in range(6))
    entry = ledger.read(handle["ledger_path"])
    assert entry["state"] == "ended" and sum(entry["request_counts"].values()) == 6
    assert listed(emu) == []  # no batch was created

    emu.stop()  # a rerun must not need the API at all
    again = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, mode="sync"))
    assert again == handle


def test_sync_mode_resumes_from_a_partial_run(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sync_resume")
    info = make_chunk(tmp_path / "work", 4)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    write_intent(ledger, info, mode="sync")
    # A dead worker answered r0 and r1 (marked so we can see they were kept, not re-asked), and tore r2.
    partial = tmp_path / "work" / "sync" / "chunk-00000.results.jsonl.partial"
    partial.parent.mkdir(parents=True)
    kept = [
        json.dumps({"custom_id": f"r{i}", "result": {"type": "canceled"}}, separators=(",", ":"))
        for i in (0, 1)
    ]
    partial.write_text("\n".join(kept) + '\n{"custom_id":"r2","res')
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, mode="sync"))
    lines = [
        json.loads(x) for x in Path(handle["results_path"].removeprefix("file://")).read_bytes().splitlines()
    ]
    by_id = {x["custom_id"]: x["result"]["type"] for x in lines}
    assert len(lines) == 4
    assert by_id["r0"] == by_id["r1"] == "canceled"
    assert by_id["r2"] != "canceled" and by_id["r3"] != "canceled"
    assert not partial.exists()


def test_sync_mode_crash_after_results_before_ledger_does_not_pay_again(
    emulator_factory, monkeypatch, tmp_path
):
    emu = emulator_factory("--processing-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sync_late_crash")
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    handle = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, mode="sync"))
    results = Path(handle["results_path"].removeprefix("file://"))
    before = results.read_bytes()
    write_intent(ledger, info, mode="sync")  # the ledger update was lost in the crash
    emu.stop()  # every request is answered already: no API call may be needed
    again = submit_idempotently(AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, mode="sync"))
    assert again["batch_id"] == handle["batch_id"]
    assert sorted(results.read_bytes().splitlines()) == sorted(before.splitlines())


def test_fatal_error_leaves_the_intent_for_a_retry(emulator, tmp_path, monkeypatch):
    conn = {"conn_type": "anthropic", "password": "wrong", "host": emulator.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_BAD", json.dumps(conn))
    info = make_chunk(tmp_path / "work", 1)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    with pytest.raises(anthropic.AuthenticationError):
        submit_idempotently(AnthropicBatchHook("ledger_bad"), ledger, **submit_kwargs(info))
    entry = ledger.read(ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"]))
    assert entry["state"] == "intent"
