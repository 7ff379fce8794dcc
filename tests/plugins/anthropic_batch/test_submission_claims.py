"""Exactly one batch per chunk under any overlap: concurrent submitters, zombies, takeovers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger, rfc3339
from anthropic_batch.submission import submit_idempotently
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator, wait_ended
from tests.plugins.anthropic_batch.test_submission import REPO, listed, submit_kwargs


@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    emu.conn_id = use_emulator(monkeypatch, emu, "claims_emu")
    return emu


def kwargs_for(info: dict, **overrides) -> dict:
    """Only arguments the old ledger had too (no lease_seconds), so each test also shows how the
    old code behaves."""
    kwargs = submit_kwargs(info, **{"run_id": "scheduled__1", **overrides})
    kwargs.pop("lease_seconds")
    return kwargs


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def run_threads(target, n: int) -> list:
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_concurrent_submitters_of_one_chunk_make_one_batch(emu, tmp_path):
    """Six submitters (say two DAG runs of one date and their retries) race on one chunk."""
    info = make_chunk(tmp_path / "work", 5)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    n = 6
    # All submitters that get as far as the create line up before sending it, so the race on the
    # ledger is as tight as it gets; a submitter alone there goes on after a short deadline.
    at_create = threading.Barrier(n, timeout=3)

    def create():
        with contextlib.suppress(threading.BrokenBarrierError):
            at_create.wait()
        return AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    handles = run_threads(
        lambda i: submit_idempotently(
            AnthropicBatchHook(emu.conn_id),
            ledger,
            **kwargs_for(info, run_id=f"run_{i % 2}__{i}"),
            submit=create,
        ),
        n,
    )
    batches = listed(emu)
    assert len(batches) == 1, [b.id for b in batches]
    assert {h["batch_id"] for h in handles} == {batches[0].id}


def test_concurrent_submitting_processes_make_one_batch(emu, tmp_path):
    """Four worker processes submit the same chunk at once: one batch, all re-attach to it."""
    info = make_chunk(tmp_path / "work", 4)
    root = tmp_path / "root"
    ready = tmp_path / "ready"
    ready.mkdir()
    n = 4
    script = f"""
import json, os, sys, time
from pathlib import Path
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger
from anthropic_batch.submission import submit_idempotently
hook = AnthropicBatchHook({emu.conn_id!r})
ready = Path({str(ready)!r})
def create():
    # Line up with the other processes that reached the create (a deadline, not a sleep).
    (ready / str(os.getpid())).touch()
    deadline = time.monotonic() + 5
    while len(list(ready.iterdir())) < {n} and time.monotonic() < deadline:
        time.sleep(0.02)
    return hook.create_batch_from_chunk({info["path"]!r})
handle = submit_idempotently(hook, SubmissionLedger({str(root)!r}), submit=create,
                             **{kwargs_for(info)!r})
print(json.dumps(handle))
"""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO / "include"), str(REPO)]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(n)
    ]
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    ids = {json.loads(out.splitlines()[-1])["batch_id"] for out, _ in outputs}
    batches = listed(emu)
    assert len(batches) == 1, [b.id for b in batches]
    assert ids == {batches[0].id}


def slow_owner_and_second(emu, tmp_path, while_blocked, **owner_kwargs) -> tuple[dict, bool, list]:
    """The owner's create blocks until ``while_blocked(path, first_entry)`` returns; meanwhile a
    second submitter of the same chunk starts. Returns both handles, whether the second one called
    create, and the batches listed."""
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    release = threading.Event()
    second_created = threading.Event()

    def slow_create():
        release.wait(timeout=60)
        return AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    def second_create():
        second_created.set()
        return AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    results: dict = {}

    def run(name: str, **kwargs) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: results.__setitem__(
                name, submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **kwargs)
            )
        )
        thread.start()
        return thread

    owner = run("owner", **kwargs_for(info), submit=slow_create, **owner_kwargs)
    first = wait_for(lambda: ledger.read(path), what="the owner's intent")
    second = run("second", **kwargs_for(info, run_id="scheduled__1_try2"), submit=second_create)
    while_blocked(ledger, path, first, second_created)
    release.set()
    owner.join(timeout=60)
    second.join(timeout=60)
    return results, second_created.is_set(), listed(emu)


def test_retry_beside_a_live_zombie_waits_for_its_batch(emu, tmp_path):
    """A zombie (alive, still submitting) holds the intent; its retry must not submit a second batch."""

    def give_the_retry_time_to_decide(ledger, path, first, second_created):
        # The old ledger submitted at once; two seconds are plenty to see that.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not second_created.is_set():
            time.sleep(0.05)

    results, second_created, batches = slow_owner_and_second(emu, tmp_path, give_the_retry_time_to_decide)
    assert not second_created, "the retry submitted beside a live zombie"
    assert results["second"]["batch_id"] == results["owner"]["batch_id"]
    assert [b.id for b in batches] == [results["owner"]["batch_id"]]


def test_two_retries_taking_over_a_dead_intent_submit_once(emu, tmp_path):
    """A worker died after claiming (before its create); two retries race to take the intent over."""
    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    long_ago = rfc3339(datetime.now(UTC) - timedelta(hours=2))
    ledger.write(
        path,
        {
            **kwargs_for(info),
            "state": "intent",
            "intent_at": long_ago,
            "heartbeat_at": long_ago,
            "owner": "dead-worker",
            "lease_seconds": 60,
            "generation": 1,
            "create_started_at": None,
            "batch_id": None,
        },
    )
    at_create = threading.Barrier(2, timeout=3)

    def create():
        with contextlib.suppress(threading.BrokenBarrierError):
            at_create.wait()
        return AnthropicBatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    handles = run_threads(
        lambda i: submit_idempotently(
            AnthropicBatchHook(emu.conn_id), ledger, **kwargs_for(info, run_id=f"retry_{i}"), submit=create
        ),
        2,
    )
    batches = listed(emu)
    assert len(batches) == 1 and {h["batch_id"] for h in handles} == {batches[0].id}
    entry = ledger.read(path)
    assert entry["generation"] == 2 and entry["taken_over_from"] == "dead-worker"


def test_an_intent_whose_heartbeat_stopped_is_taken_over_after_its_lease(emu, tmp_path):
    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    now = rfc3339(datetime.now(UTC))  # fresh by the wall clock: only a lease of silence tells
    ledger.write(
        path,
        {
            **kwargs_for(info),
            "state": "intent",
            "intent_at": now,
            "heartbeat_at": now,
            "owner": "killed",
            "lease_seconds": 1.0,
            "generation": 1,
            "create_started_at": None,
            "batch_id": None,
        },
    )
    started = time.monotonic()
    handle = submit_idempotently(AnthropicBatchHook(emu.conn_id), ledger, **kwargs_for(info))
    assert time.monotonic() - started >= 1.0  # it waited out the lease before taking over
    assert [b.id for b in listed(emu)] == [handle["batch_id"]]
    assert ledger.read(path)["taken_over_from"] == "killed"


def test_the_owner_heartbeat_keeps_a_slow_create_alive(emu, tmp_path):
    """A create slower than the lease is not taken over: the owner's heartbeat keeps the intent alive."""

    def three_leases_of_heartbeats(ledger, path, first, second_created):
        t0 = time.monotonic()
        wait_for(
            lambda: (
                time.monotonic() - t0 > 1.2 and ledger.read(path)["heartbeat_at"] != first["heartbeat_at"]
            ),
            what="three leases of heartbeats",
        )

    results, second_created, batches = slow_owner_and_second(
        emu, tmp_path, three_leases_of_heartbeats, lease_seconds=0.4
    )
    assert not second_created
    assert results["second"]["batch_id"] == results["owner"]["batch_id"]
    assert len(batches) == 1


def test_a_batch_created_after_losing_the_claim_is_canceled(emu, tmp_path):
    """A worker paused past its lease was taken over and the new owner recorded its batch; the
    paused worker's create, sent after all, loses: canceled at once, never recorded as the chunk's."""
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    hook = AnthropicBatchHook(emu.conn_id)
    winner: dict = {}

    def taken_over_then_create():
        # What the new owner did while this worker was paused (after its fence).
        winner["batch"] = hook.create_batch_from_chunk(info["path"])
        entry = ledger.read(path)
        ledger.write(path, {**entry, "owner": "retry", "batch_id": winner["batch"].id, "state": "submitted"})
        return hook.create_batch_from_chunk(info["path"])

    handle = submit_idempotently(hook, ledger, **kwargs_for(info), submit=taken_over_then_create)
    assert handle["batch_id"] == winner["batch"].id
    entry = ledger.read(path)
    assert entry["batch_id"] == winner["batch"].id
    (duplicate,) = entry["duplicate_batch_ids"]
    assert wait_ended(sdk_client(emu), duplicate).cancel_initiated_at is not None
    assert duplicate in ledger.known_batch_ids()
