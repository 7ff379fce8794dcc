"""AdmissionTrigger (issue 9, item 5): the admission wait runs in the triggerer, on real local storage.

The trigger's ticket waits behind another one; a concurrent task releases that one and the trigger
yields ``admitted`` (one event, same ticket: the place was kept). While it waits longer than a lease
its beats keep the ticket counted; a trigger restarted after its ticket went stale (a crashed
triggerer) queues again at the back.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from anthropic_batch import queue_budget
from anthropic_batch.admission_trigger import CLASSPATH, AdmissionTrigger
from anthropic_batch.queue_budget import TicketQueue, acquire


@pytest.fixture(autouse=True)
def no_deployment_budget(monkeypatch):
    monkeypatch.delenv(queue_budget.DEPLOYMENT_BUDGET_ENV, raising=False)
    monkeypatch.setattr(queue_budget, "_variable_budget", lambda: None)


def ledger_file(tmp_path: Path, name: str, **entry) -> str:
    path = tmp_path / "ledger" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry:
        path.write_text(json.dumps(entry))
    return str(path)


def trigger_for(tmp_path: Path, name: str, n: int, **kwargs) -> AdmissionTrigger:
    kwargs.setdefault("poll_interval", 0.02)
    kwargs.setdefault("max_poll_interval", 0.1)
    return AdmissionTrigger(
        owner=f"owner-{name}",
        ledger_path=ledger_file(tmp_path, name),
        n_requests=n,
        pipeline="p",
        pipeline_budget=kwargs.pop("pipeline_budget", 100),
        queue_root=str(tmp_path / "root"),
        conn_id="anthropic_test",
        **kwargs,
    )


def hold(tmp_path: Path, name: str, n: int) -> dict:
    """An admitted ticket whose batch runs (its ledger entry has a batch id)."""
    ticket, admission = acquire(
        TicketQueue(tmp_path / "root"),
        owner=f"owner-{name}",
        ledger_path=ledger_file(tmp_path, name, batch_id=f"msgbatch_{name}", state="submitted"),
        n_requests=n,
        pipeline="p",
        pipeline_budget=100,
        budget=None,
    )
    assert admission.admitted
    return ticket


async def until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` (a blocking check, run in a thread) until true, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def waiting_ticket(tmp_path: Path, owner: str) -> dict | None:
    return next((t for t in TicketQueue(tmp_path / "root").tickets() if t["owner"] == owner), None)


def test_serialize_round_trip_has_only_plain_kwargs_and_no_secret(tmp_path):
    trigger = trigger_for(tmp_path, "x", 10, budget=30, after_batch_id="msgbatch_old", deadline=123.0)
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert AdmissionTrigger(**kwargs).serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs  # stored in the metadata DB as JSON
    assert kwargs["conn_id"] == "anthropic_test" and not any("key" in k for k in kwargs)
    assert kwargs["poll_interval"] == 0.02 and kwargs["lease_seconds"] == queue_budget.LEASE_SECONDS
    defaults = AdmissionTrigger("o", "/l.json", 1, "p", 10).serialize()[1]
    assert (defaults["poll_interval"], defaults["max_poll_interval"]) == (5.0, 60.0)


async def test_waits_in_the_triggerer_until_a_concurrent_release_admits_it(tmp_path):
    first = hold(tmp_path, "a", 80)
    trigger = trigger_for(tmp_path, "b", 40)

    async def release_when_b_waits() -> None:
        await until(lambda: waiting_ticket(tmp_path, "owner-b") is not None, what="b's ticket")
        await asyncio.to_thread(TicketQueue(tmp_path / "root").release, first)

    releaser = asyncio.create_task(release_when_b_waits())
    events = trigger.run()
    event = (await asyncio.wait_for(events.__anext__(), 30)).payload
    await releaser
    assert event["status"] == "admitted" and event["seq"] == 2
    with pytest.raises(StopAsyncIteration):  # exactly one event: the task resumes once
        await events.__anext__()
    ticket = waiting_ticket(tmp_path, "owner-b")
    assert ticket["seq"] == 2 and ticket["admitted_at"]


async def test_beats_keep_the_place_through_a_wait_longer_than_the_lease(tmp_path):
    lease = 1.0
    first = hold(tmp_path, "a", 80)
    trigger = trigger_for(tmp_path, "b", 40, lease_seconds=lease, max_poll_interval=5.0)
    observer = TicketQueue(tmp_path / "root", lease_seconds=lease)

    async def observe_then_release() -> None:
        await until(lambda: waiting_ticket(tmp_path, "owner-b") is not None, what="b's ticket")
        end = time.monotonic() + 2.5 * lease
        while time.monotonic() < end:  # the others count b all along (its heartbeat stays fresh)
            assert await asyncio.to_thread(observer.is_live, waiting_ticket(tmp_path, "owner-b"))
            await asyncio.sleep(0.05)
        # a's heartbeat is long stale, but its batch still runs per the ledger: it still counts
        assert await asyncio.to_thread(observer.is_live, first)
        await asyncio.to_thread(observer.release, first)

    watcher = asyncio.create_task(observe_then_release())
    event = (await asyncio.wait_for(trigger.run().__anext__(), 30)).payload
    await watcher
    assert event["status"] == "admitted" and event["seq"] == 2  # the same ticket: place kept


async def test_a_restarted_trigger_whose_ticket_went_stale_queues_again_at_the_back(tmp_path):
    """The triggerer crashed: nobody beat b's ticket for longer than the lease, the others stopped
    counting it and c took its turn. The restarted trigger does not revive b: it queues at the back."""
    queue = TicketQueue(tmp_path / "root")
    first = hold(tmp_path, "a", 60)
    stale, _ = acquire(
        queue, owner="owner-b", ledger_path=ledger_file(tmp_path, "b"), n_requests=40,
        pipeline="p", pipeline_budget=100, budget=None,
    )  # fmt: skip
    long_ago = datetime.fromtimestamp(time.time() - queue.lease_seconds - 5, UTC).isoformat()
    queue._update(stale["seq"], lambda t: {**t, "heartbeat_at": long_ago})
    assert not queue.is_live(queue.tickets()[1])
    c_ledger = ledger_file(tmp_path, "c", batch_id="msgbatch_c", state="submitted")
    c, c_admission = acquire(
        queue, owner="owner-c", ledger_path=c_ledger, n_requests=40,
        pipeline="p", pipeline_budget=100, budget=None,
    )  # fmt: skip
    assert c_admission.admitted  # 60 + 40: b no longer counted
    trigger = trigger_for(tmp_path, "b", 40)

    async def release_a_when_b_requeued() -> None:
        def requeued() -> bool:
            return any(t["owner"] == "owner-b" and t["seq"] > c["seq"] for t in queue.tickets())

        await until(requeued, what="b's new ticket")
        await asyncio.to_thread(queue.release, first)

    releaser = asyncio.create_task(release_a_when_b_requeued())
    event = (await asyncio.wait_for(trigger.run().__anext__(), 30)).payload
    await releaser
    assert event["status"] == "admitted" and event["seq"] == c["seq"] + 1
    assert queue.tickets()[1]["released_at"]  # the stale ticket is given up, not revived


async def test_another_try_created_the_batch_meanwhile(tmp_path):
    hold(tmp_path, "a", 100)
    trigger = trigger_for(tmp_path, "b", 40)

    async def create_b_batch() -> None:
        await until(lambda: waiting_ticket(tmp_path, "owner-b") is not None, what="b's ticket")
        ledger_file(tmp_path, "b", batch_id="msgbatch_b", state="submitted")

    writer = asyncio.create_task(create_b_batch())
    event = (await asyncio.wait_for(trigger.run().__anext__(), 30)).payload
    await writer
    assert event == {"status": "attached", "batch_id": "msgbatch_b", "ledger_path": trigger.ledger_path}


async def test_a_chunk_that_can_never_fit_is_a_fatal_error_event(tmp_path):
    event = (await trigger_for(tmp_path, "big", 150).run().__anext__()).payload
    assert event["status"] == "error" and event["error_type"] == "QueueBudgetError"
    assert "can never fit" in event["message"]


async def test_deadline_gives_up_and_releases_the_ticket(tmp_path):
    hold(tmp_path, "a", 100)
    trigger = trigger_for(tmp_path, "b", 40, deadline=time.time() + 0.3)
    event = (await asyncio.wait_for(trigger.run().__anext__(), 30)).payload
    assert event["status"] == "timeout"
    assert waiting_ticket(tmp_path, "owner-b")["released_at"]


def test_admission_intervals_are_independent_of_the_batch_poll(monkeypatch):
    monkeypatch.delenv(queue_budget.ADMISSION_POLL_ENV, raising=False)
    assert queue_budget.admission_intervals() == (5.0, 60.0)
    assert queue_budget.admission_intervals(2.0, 10.0) == (2.0, 10.0)
    monkeypatch.setenv(queue_budget.ADMISSION_POLL_ENV, "1")
    assert queue_budget.admission_intervals() == (1.0, 4.0)
    monkeypatch.setenv(queue_budget.ADMISSION_POLL_ENV, "soon")
    with pytest.raises(queue_budget.QueueBudgetError, match=queue_budget.ADMISSION_POLL_ENV):
        queue_budget.admission_intervals()


def test_importable_by_classpath_in_a_fresh_interpreter():
    """Like a triggerer: only plugins/ on sys.path, import by the serialized classpath."""
    module, _, name = CLASSPATH.rpartition(".")
    script = (
        "import importlib\n"
        f"cls = getattr(importlib.import_module({module!r}), {name!r})\n"
        "t = cls(owner='o', ledger_path='/l.json', n_requests=1, pipeline='p', pipeline_budget=2)\n"
        f"assert t.serialize()[0] == {CLASSPATH!r}\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3] / "plugins")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd="/", capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
