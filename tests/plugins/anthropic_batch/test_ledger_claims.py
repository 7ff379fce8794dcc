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

from anthropic_batch.hooks import BatchHook
from anthropic_batch.ledger import SubmissionLedger, rfc3339, submit_idempotently
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator, wait_ended
from tests.plugins.anthropic_batch.test_ledger import REPO, listed

BASE = {
    "dag_id": "dag",
    "task_id": "submit",
    "partition": "2026-11-01",
    "pipeline": "pipe",
    "attempt": 1,
    "model": "claude-haiku-4-5",
    "mode": "batch",
    "orphan_settle_seconds": 0,
}


@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    emu.conn_id = use_emulator(monkeypatch, emu, "claims_emu")
    return emu


def kwargs_for(info: dict, **overrides) -> dict:
    """Only arguments the old ledger had too, so each test also shows how the old code behaves."""
    return {
        "chunk_path": info["path"],
        "chunk_fingerprint": info["fingerprint"],
        "n_requests": info["n_requests"],
        "n_bytes": info["n_bytes"],
        "run_id": "scheduled__1",
        "map_index": info["index"],
        **BASE,
        **overrides,
    }


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
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    handles = run_threads(
        lambda i: submit_idempotently(
            BatchHook(emu.conn_id), ledger, **kwargs_for(info, run_id=f"run_{i % 2}__{i}"), submit=create
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
from anthropic_batch.hooks import BatchHook
from anthropic_batch.ledger import SubmissionLedger, submit_idempotently
hook = BatchHook({emu.conn_id!r})
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


def test_retry_beside_a_live_zombie_waits_for_its_batch(emu, tmp_path):
    """A zombie (alive, still submitting) holds the intent; its retry must not submit a second batch."""
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    release = threading.Event()
    retry_created = threading.Event()

    def slow_create():
        release.wait(timeout=60)
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    def retry_create():
        retry_created.set()
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    results: dict = {}
    zombie = threading.Thread(
        target=lambda: results.__setitem__(
            "zombie",
            submit_idempotently(BatchHook(emu.conn_id), ledger, **kwargs_for(info), submit=slow_create),
        )
    )
    zombie.start()
    wait_for(lambda: ledger.read(path), what="the zombie's intent")
    retry = threading.Thread(
        target=lambda: results.__setitem__(
            "retry",
            submit_idempotently(
                BatchHook(emu.conn_id),
                ledger,
                **kwargs_for(info, run_id="scheduled__1_try2"),
                submit=retry_create,
            ),
        )
    )
    retry.start()
    # Give the retry time to decide (the old ledger submitted at once); then let the zombie finish.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not retry_created.is_set():
        time.sleep(0.05)
    release.set()
    zombie.join(timeout=60)
    retry.join(timeout=60)
    assert not retry_created.is_set(), "the retry submitted beside a live zombie"
    assert results["retry"]["batch_id"] == results["zombie"]["batch_id"]
    assert [b.id for b in listed(emu)] == [results["zombie"]["batch_id"]]


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
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    handles = run_threads(
        lambda i: submit_idempotently(
            BatchHook(emu.conn_id), ledger, **kwargs_for(info, run_id=f"retry_{i}"), submit=create
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
    handle = submit_idempotently(BatchHook(emu.conn_id), ledger, **kwargs_for(info))
    assert time.monotonic() - started >= 1.0  # it waited out the lease before taking over
    assert [b.id for b in listed(emu)] == [handle["batch_id"]]
    assert ledger.read(path)["taken_over_from"] == "killed"


def test_the_owner_heartbeat_keeps_a_slow_create_alive(emu, tmp_path):
    """A create slower than the lease is not taken over: the owner's heartbeat keeps the intent alive."""
    info = make_chunk(tmp_path / "work", 2)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    release = threading.Event()
    second_created = threading.Event()

    def slow_create():
        release.wait(timeout=60)
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    def second_create():
        second_created.set()
        return BatchHook(emu.conn_id).create_batch_from_chunk(info["path"])

    results: dict = {}
    owner = threading.Thread(
        target=lambda: results.__setitem__(
            "owner",
            submit_idempotently(
                BatchHook(emu.conn_id), ledger, **kwargs_for(info), submit=slow_create, lease_seconds=0.4
            ),
        )
    )
    owner.start()
    first = wait_for(lambda: ledger.read(path), what="the owner's intent")
    other = threading.Thread(
        target=lambda: results.__setitem__(
            "other",
            submit_idempotently(
                BatchHook(emu.conn_id), ledger, **kwargs_for(info, run_id="manual__2"), submit=second_create
            ),
        )
    )
    other.start()
    # Three leases pass with the create still blocked; the owner's heartbeats change the entry.
    t0 = time.monotonic()
    wait_for(
        lambda: time.monotonic() - t0 > 1.2 and ledger.read(path)["heartbeat_at"] != first["heartbeat_at"],
        what="three leases of heartbeats",
    )
    assert ledger.read(path)["heartbeat_at"] != first["heartbeat_at"]
    release.set()
    owner.join(timeout=60)
    other.join(timeout=60)
    assert not second_created.is_set()
    assert results["other"]["batch_id"] == results["owner"]["batch_id"]
    assert len(listed(emu)) == 1


def test_a_batch_created_after_losing_the_claim_is_canceled(emu, tmp_path):
    """A worker paused past its lease was taken over and the new owner recorded its batch; the
    paused worker's create, sent after all, loses: canceled at once, never recorded as the chunk's."""
    info = make_chunk(tmp_path / "work", 3)
    ledger = SubmissionLedger(str(tmp_path / "root"))
    path = ledger.entry_path("dag", "2026-11-01", "submit", info["fingerprint"])
    hook = BatchHook(emu.conn_id)
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
