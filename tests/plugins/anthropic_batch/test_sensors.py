"""AnthropicBatchSensor: poke mode, deferrable mode (TaskDeferred -> trigger -> execute_complete),
failures."""

from __future__ import annotations

import time

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from anthropic_batch.cancel import user_canceled_batches
from anthropic_batch.hooks import AnthropicBatchHook
from anthropic_batch.ledger import SubmissionLedger
from anthropic_batch.sensors import AnthropicBatchSensor, batch_id_of, deadline_epoch
from anthropic_batch.submission import submit_idempotently
from anthropic_batch.triggers import BatchPollTrigger
from tests.plugins.anthropic_batch._operator_context import make_context
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator, wait_ended
from tests.plugins.anthropic_batch.test_submission import submit_kwargs
from tests.plugins.anthropic_batch.test_triggers import first_event


def submitted(conn_id: str, tmp_path, n: int = 3, **overrides) -> tuple[dict, SubmissionLedger]:
    ledger = SubmissionLedger(str(tmp_path / "root"))
    info = make_chunk(tmp_path / "work", n)
    return submit_idempotently(
        AnthropicBatchHook(conn_id), ledger, **submit_kwargs(info, **overrides)
    ), ledger


def test_batch_id_of_and_deadline():
    assert batch_id_of("msgbatch_1") == "msgbatch_1"
    assert batch_id_of({"batch_id": "msgbatch_2", "mode": "batch"}) == "msgbatch_2"
    with pytest.raises(ValueError, match="BatchHandle"):
        batch_id_of({"mode": "batch"})
    from datetime import UTC, datetime

    created = datetime(2026, 11, 1, tzinfo=UTC)
    assert deadline_epoch(created, 30, now=0) == created.timestamp() + 30 * 3600
    assert deadline_epoch(None, 1, now=100.0) == 3700.0


def test_poke_mode_waits_and_records_the_end(emulator, anthropic_conn, tmp_path):
    handle, ledger = submitted(anthropic_conn, tmp_path)
    sensor = AnthropicBatchSensor(
        task_id="wait", handle=handle, conn_id=anthropic_conn, deferrable=False, poll_interval=0.2
    )
    batch = sensor.execute(make_context(task_id="wait"))
    assert batch["id"] == handle["batch_id"]
    assert batch["processing_status"] == "ended"
    entry = ledger.read(handle["ledger_path"])
    assert entry["state"] == "ended"
    assert entry["processing_status"] == "ended"
    assert entry["ended_at"] and entry["expires_at"]
    assert sum(entry["request_counts"].values()) == 3


async def test_deferrable_defers_then_completes(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "1.5")
    conn_id = use_emulator(monkeypatch, emu, "sensor_defer")
    handle, ledger = submitted(conn_id, tmp_path)
    sensor = AnthropicBatchSensor(
        task_id="wait", handle=handle, conn_id=conn_id, poll_interval=0.1, deadline_hours=2
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(make_context(task_id="wait"))
    trigger = deferred.value.trigger
    assert isinstance(trigger, BatchPollTrigger)
    assert deferred.value.method_name == "execute_complete"
    created = sdk_client(emu).messages.batches.retrieve(handle["batch_id"]).created_at
    assert trigger.deadline == pytest.approx(created.timestamp() + 2 * 3600)
    assert deferred.value.timeout.total_seconds() > trigger.deadline - time.time()

    event = await first_event(trigger)
    # The task resumes as a fresh operator instance.
    fresh = AnthropicBatchSensor(task_id="wait", handle=handle, conn_id=conn_id)
    batch = fresh.execute_complete(make_context(task_id="wait"), event)
    assert batch["id"] == handle["batch_id"] and batch["processing_status"] == "ended"
    assert ledger.read(handle["ledger_path"])["state"] == "ended"


def test_deferrable_returns_at_once_when_already_ended(emulator, anthropic_conn, tmp_path):
    handle, _ = submitted(anthropic_conn, tmp_path)
    wait_ended(sdk_client(emulator), handle["batch_id"])
    sensor = AnthropicBatchSensor(
        task_id="wait", handle=handle["batch_id"], conn_id=anthropic_conn
    )  # bare id
    assert sensor.execute(make_context(task_id="wait"))["processing_status"] == "ended"


def test_sync_handle_returns_immediately(tmp_path):
    handle = {
        "batch_id": "sync_abc",
        "chunk_path": "file:///x/requests/chunk-00000.jsonl",
        "ledger_path": str(tmp_path / "nope.json"),
        "mode": "sync",
        "attempt": 1,
        "results_path": "file:///x/sync/chunk-00000.results.jsonl",
        "n_requests": 2,
    }
    # No connection exists for this conn id: returning must not touch the API.
    sensor = AnthropicBatchSensor(task_id="wait", handle=handle, conn_id="does_not_exist")
    # An older sync handle (a fake "sync_" batch id) is read as the sync run it is; the sensor
    # returns the handle, not a made-up batch.
    returned = sensor.execute(make_context(task_id="wait"))
    assert returned["mode"] == "sync" and returned["batch_id"] is None
    assert returned["sync_run_id"] == "sync_abc"
    assert returned["results_path"] == handle["results_path"]


def test_deadline_cancels_then_waits_for_the_cancellation_and_succeeds(
    emulator_factory, monkeypatch, tmp_path
):
    """On the deadline the sensor cancels (recorded as ours in the ledger) and keeps waiting, deferred,
    until the batch has ended; then it succeeds so collect and resubmit get the canceled requests."""
    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "1.5")
    conn_id = use_emulator(monkeypatch, emu, "sensor_deadline")
    handle, ledger = submitted(conn_id, tmp_path)
    sensor = AnthropicBatchSensor(
        task_id="wait", handle=handle, conn_id=conn_id, poll_interval=0.1, cancel_wait_hours=1
    )
    event = {
        "status": "deadline",
        "batch_id": handle["batch_id"],
        "message": "Batch had not ended.",
        "batch": None,
    }
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute_complete(make_context(task_id="wait"), event)
    assert sdk_client(emu).messages.batches.retrieve(handle["batch_id"]).cancel_initiated_at is not None
    entry = ledger.read(handle["ledger_path"])
    assert entry["cancel_reason"] == "deadline" and entry["cancel_requested_at"]
    assert deferred.value.kwargs == {"canceling": True}
    assert deferred.value.trigger.deadline == pytest.approx(time.time() + 3600, abs=60)

    batch = await_resume(deferred.value, handle, conn_id)
    assert batch["processing_status"] == "ended"
    assert batch["request_counts"]["canceled"] == 3
    entry = ledger.read(handle["ledger_path"])
    assert entry["state"] == "ended" and entry["cancel_reason"] == "deadline"
    assert user_canceled_batches(ledger.root, "dag", "2026-11-01") == {}  # ours: retriable, not a user's


def await_resume(deferred: TaskDeferred, handle: dict, conn_id: str) -> dict:
    """Run the trigger like a triggerer (after a serialize round trip) and resume a fresh sensor."""
    import asyncio

    _, kwargs = deferred.trigger.serialize()
    event = asyncio.run(first_event(BatchPollTrigger(**kwargs)))
    fresh = AnthropicBatchSensor(task_id="wait", handle=handle, conn_id=conn_id, poll_interval=0.1)
    return getattr(fresh, deferred.method_name)(
        make_context(task_id="wait"), event, **(deferred.kwargs or {})
    )


@pytest.mark.parametrize("first_try_canceled", [True, False])
def test_a_try_after_the_deadline_waits_for_the_cancellation(
    emulator_factory, monkeypatch, tmp_path, first_try_canceled
):
    """A retry (or a cleared sensor) starting past the deadline must not fail while the batch is
    ``canceling``: it cancels if needed, waits for ``ended`` and succeeds."""
    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "2")
    conn_id = use_emulator(monkeypatch, emu, "sensor_retry")
    handle, ledger = submitted(conn_id, tmp_path)
    client = sdk_client(emu)
    if first_try_canceled:  # the first try hit the deadline and asked for the cancel
        assert client.messages.batches.cancel(handle["batch_id"]).processing_status == "canceling"
    # 3.6 ms after creation: the deadline has passed by the time this try starts.
    sensor = AnthropicBatchSensor(
        task_id="wait", handle=handle, conn_id=conn_id, poll_interval=0.1, deadline_hours=1e-6
    )
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(make_context(task_id="wait", try_number=2))
    assert deferred.value.trigger.deadline > time.time() + 600  # the cancellation gets its own time
    assert client.messages.batches.retrieve(handle["batch_id"]).cancel_initiated_at is not None
    if not first_try_canceled:
        assert ledger.read(handle["ledger_path"])["cancel_reason"] == "deadline"
    batch = await_resume(deferred.value, handle, conn_id)
    assert batch["processing_status"] == "ended"
    assert batch["request_counts"]["canceled"] == 3


def test_a_batch_that_never_finishes_canceling_fails_the_task():
    sensor = AnthropicBatchSensor(task_id="wait", handle="msgbatch_1", cancel_wait_hours=0.5)
    event = {"status": "deadline", "batch_id": "msgbatch_1", "message": "not ended", "batch": None}
    with pytest.raises(AirflowException, match=r"did not finish canceling within 0\.5 h"):
        sensor.execute_complete({}, event, canceling=True)
    # Without the deferral kwargs (dag.test drops them) the last seen batch tells the same.
    seen = {**event, "batch": {"id": "msgbatch_1", "cancel_initiated_at": "2026-11-01T00:00:00Z"}}
    with pytest.raises(AirflowException, match="did not finish canceling"):
        sensor.execute_complete({}, seen)


def test_poke_mode_past_the_deadline_cancels_and_keeps_poking(emulator_factory, monkeypatch, tmp_path):
    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "1")
    conn_id = use_emulator(monkeypatch, emu, "sensor_poke_deadline")
    handle, ledger = submitted(conn_id, tmp_path)
    sensor = AnthropicBatchSensor(
        task_id="wait",
        handle=handle,
        conn_id=conn_id,
        deferrable=False,
        poll_interval=0.2,
        deadline_hours=1e-6,
    )
    batch = sensor.execute(make_context(task_id="wait"))
    assert batch["processing_status"] == "ended" and batch["request_counts"]["canceled"] == 3
    assert ledger.read(handle["ledger_path"])["cancel_reason"] == "deadline"


def test_error_events():
    sensor = AnthropicBatchSensor(task_id="wait", handle="msgbatch_1")
    fatal = {
        "status": "error",
        "batch_id": "msgbatch_1",
        "message": "bad key",
        "error_type": "AuthenticationError",
    }
    with pytest.raises(AirflowFailException, match="bad key"):
        sensor.execute_complete({}, fatal)
    transient = {**fatal, "error_type": "OverloadedError"}
    with pytest.raises(AirflowException) as err:
        sensor.execute_complete({}, transient)
    assert not isinstance(err.value, AirflowFailException)
    with pytest.raises(AirflowException, match="no usable event"):
        sensor.execute_complete({}, None)


def test_poke_mode_bad_key_fails_without_retry(emulator, monkeypatch):
    import json

    conn = {"conn_type": "anthropic", "password": "wrong", "host": emulator.base_url}
    monkeypatch.setenv("AIRFLOW_CONN_SENSOR_BAD", json.dumps(conn))
    sensor = AnthropicBatchSensor(task_id="wait", handle="msgbatch_x", conn_id="sensor_bad", deferrable=False)
    with pytest.raises(AirflowFailException):
        sensor.execute(make_context(task_id="wait"))


def test_a_deadline_cancel_never_overwrites_a_users_cancel(tmp_path):
    from anthropic_batch.cancel import CancelReason, record_cancel
    from anthropic_batch.storage import atomic_write_json

    path = str(tmp_path / "entry.json")
    atomic_write_json(path, {"batch_id": "msgbatch_1", "state": "submitted"})
    record_cancel(path, CancelReason.USER, by="alice")
    entry = record_cancel(path, CancelReason.DEADLINE)
    assert entry["cancel_reason"] == "user" and entry["canceled_by"] == "alice"
