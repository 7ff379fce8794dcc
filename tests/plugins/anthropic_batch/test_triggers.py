"""BatchPollTrigger against the emulator: one event, tolerance, fatal errors, on_kill, importability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.triggers import CLASSPATH, BatchPollTrigger, jittered, next_interval
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator

REPO = Path(__file__).resolve().parents[3]


def trigger_for(batch_id: str, conn_id: str, **kwargs) -> BatchPollTrigger:
    kwargs.setdefault("deadline", time.time() + 60)
    kwargs.setdefault("poll_interval", 0.05)
    kwargs.setdefault("max_poll_interval", 0.2)
    return BatchPollTrigger(batch_id=batch_id, conn_id=conn_id, **kwargs)


async def first_event(trigger: BatchPollTrigger) -> dict:
    events = trigger.run()
    event = await events.__anext__()
    with pytest.raises(StopAsyncIteration):  # exactly one event
        await events.__anext__()
    return event.payload


def create(conn_id: str, tmp_path: Path, n: int = 3) -> str:
    return AnthropicBatchHook(conn_id).create_batch_from_chunk(make_chunk(tmp_path, n)["path"]).id


# -- pure ----------------------------------------------------------------------------------------
def test_interval_grows_while_idle_and_resets_on_change():
    assert next_interval(10, changed=False, poll_interval=10, max_poll_interval=100) == 15
    assert next_interval(90, changed=False, poll_interval=10, max_poll_interval=100) == 100
    assert next_interval(100, changed=False, poll_interval=10, max_poll_interval=100) == 100
    assert next_interval(80, changed=True, poll_interval=10, max_poll_interval=100) == 10
    for _ in range(50):
        assert 9 <= jittered(10, remaining=1000) <= 11
    assert jittered(10, remaining=2) == 2
    assert jittered(10, remaining=-1) == 0


def test_serialize_round_trip_has_no_secret():
    trigger = BatchPollTrigger("msgbatch_x", "anthropic_default", 123.0, 5, 50, max_transient_seconds=90)
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert kwargs == {
        "batch_id": "msgbatch_x",
        "conn_id": "anthropic_default",
        "deadline": 123.0,
        "poll_interval": 5.0,
        "max_poll_interval": 50.0,
        "max_transient_seconds": 90.0,
    }
    assert BatchPollTrigger(**kwargs).serialize() == (classpath, kwargs)
    json.dumps(kwargs)  # stored in the metadata DB as JSON


def test_patience_defaults_to_a_duration_well_above_an_outage():
    _, kwargs = BatchPollTrigger("msgbatch_x").serialize()
    assert kwargs["max_transient_seconds"] >= 15 * 60
    assert "max_transient_errors" not in kwargs


def test_kwargs_serialized_by_the_previous_version_still_load():
    """A trigger row written before the upgrade carries max_transient_errors: it must still load."""
    old = {
        "batch_id": "msgbatch_x",
        "conn_id": "anthropic_default",
        "deadline": 123.0,
        "poll_interval": 5.0,
        "max_poll_interval": 50.0,
        "max_transient_errors": 10,
    }
    _, kwargs = BatchPollTrigger(**old).serialize()
    assert kwargs["max_transient_seconds"] >= 15 * 60


def test_importable_by_classpath_in_a_fresh_interpreter():
    """Like a triggerer: only plugins/ on sys.path, import by the serialized classpath."""
    module, _, name = CLASSPATH.rpartition(".")
    script = (
        "import importlib, sys\n"
        f"cls = getattr(importlib.import_module({module!r}), {name!r})\n"
        "t = cls(batch_id='msgbatch_x', conn_id='c', deadline=1.0, poll_interval=1.0,"
        " max_poll_interval=2.0, max_transient_errors=1)\n"
        f"assert t.serialize()[0] == {CLASSPATH!r}\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO / "plugins")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd="/", capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


# -- against the emulator ------------------------------------------------------------------------
async def test_ended_event_carries_the_batch(emulator, anthropic_conn, tmp_path):
    batch_id = create(anthropic_conn, tmp_path)
    event = await first_event(trigger_for(batch_id, anthropic_conn))
    assert event["status"] == "ended"
    assert event["batch_id"] == batch_id
    assert event["batch"]["id"] == batch_id
    assert event["batch"]["processing_status"] == "ended"
    assert sum(event["batch"]["request_counts"].values()) == 3
    json.dumps(event)  # the event crosses the DB: it must be plain JSON


async def test_deadline_event(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "60")
    conn_id = use_emulator(monkeypatch, emu, "slow")
    batch_id = create(conn_id, tmp_path)
    event = await first_event(trigger_for(batch_id, conn_id, deadline=time.time() + 0.5))
    assert event["status"] == "deadline"
    assert event["batch"]["processing_status"] == "in_progress"
    assert "deadline" in event["message"]


def no_sdk_retries(monkeypatch, emu, conn_id: str) -> str:
    """A connection whose SDK does not retry: every fault reaches the trigger's own tolerance."""
    conn = {
        "conn_type": "anthropic",
        "password": emu.api_key,
        "host": emu.base_url,
        "extra": {"anthropic_client_kwargs": {"max_retries": 0}},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


async def test_tolerates_early_404(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--early-404-seconds", "0.6", "--processing-seconds", "0.8")
    conn_id = use_emulator(monkeypatch, emu, "early")
    batch_id = create(conn_id, tmp_path)
    event = await first_event(trigger_for(batch_id, conn_id))
    assert event["status"] == "ended"


async def test_patience_is_time_not_polls(emulator_factory, monkeypatch, tmp_path):
    """A short poll interval must not shrink the patience: 3 s of early 404s at 20 polls a second
    (dozens of failures in a row) is well within the default duration, after a serialize round trip
    as the triggerer does it."""
    emu = emulator_factory("--early-404-seconds", "3", "--processing-seconds", "3.5")
    conn_id = no_sdk_retries(monkeypatch, emu, "early_fast")
    batch_id = create(conn_id, tmp_path)
    classpath, kwargs = BatchPollTrigger(
        batch_id=batch_id,
        conn_id=conn_id,
        deadline=time.time() + 60,
        poll_interval=0.05,
        max_poll_interval=0.05,
    ).serialize()
    assert classpath == CLASSPATH
    event = await first_event(BatchPollTrigger(**kwargs))
    assert event["status"] == "ended", event


async def test_outage_longer_than_the_patience_is_an_error_event(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--http-fault", "retrieve:529:1.0")
    conn_id = no_sdk_retries(monkeypatch, emu, "overloaded")
    batch_id = AnthropicBatchHook(conn_id).create_batch_from_chunk(make_chunk(tmp_path, 1)["path"]).id
    started = time.monotonic()
    event = await first_event(trigger_for(batch_id, conn_id, max_transient_seconds=1.0))
    elapsed = time.monotonic() - started
    assert event["status"] == "error"
    assert "kept failing for" in event["message"] and "max_transient_seconds=1" in event["message"]
    assert event["error_type"] == "OverloadedError"
    assert 1.0 <= elapsed < 10


async def test_tolerates_429_and_500(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory(
        "--http-fault", "retrieve:429:0.4", "--http-fault", "retrieve:500:0.3", "--processing-seconds", "0.5"
    )
    # No SDK retries: every fault reaches the trigger's own tolerance.
    conn = {
        "conn_type": "anthropic",
        "password": emu.api_key,
        "host": emu.base_url,
        "extra": {"anthropic_client_kwargs": {"max_retries": 0}},
    }
    monkeypatch.setenv("AIRFLOW_CONN_FLAKY", json.dumps(conn))
    batch_id = AnthropicBatchHook("flaky").create_batch_from_chunk(make_chunk(tmp_path, 2)["path"]).id
    event = await first_event(trigger_for(batch_id, "flaky"))
    assert event["status"] == "ended"


async def test_bad_key_is_fatal_at_once(emulator, monkeypatch):
    conn = {"conn_type": "anthropic", "password": "not-the-key", "host": emulator.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_BADKEY", json.dumps(conn))
    started = time.monotonic()
    event = await first_event(trigger_for("msgbatch_whatever", "badkey", max_transient_seconds=3600))
    assert event["status"] == "error"
    assert event["error_type"] == "AuthenticationError"
    assert time.monotonic() - started < 10  # not retried into the ground


async def test_on_kill_leaves_the_batch_running(emulator_factory, monkeypatch, tmp_path):
    """Airflow calls on_kill on clear as on mark-failed: a clear must re-attach, so no cancel here."""
    emu = emulator_factory("--processing-seconds", "60")
    conn_id = use_emulator(monkeypatch, emu, "killme")
    batch_id = create(conn_id, tmp_path, n=4)
    await trigger_for(batch_id, conn_id).on_kill()
    batch = sdk_client(emu).messages.batches.retrieve(batch_id)
    assert batch.processing_status == "in_progress"
    assert batch.cancel_initiated_at is None
