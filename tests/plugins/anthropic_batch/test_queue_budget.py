"""Queue budget admission (issue 9, item 5): tickets in FIFO order, per-pipeline and deployment limits.

Fast tests of :mod:`anthropic_batch.queue_budget` on local storage (a retry takes over its ticket, a
stale ticket is never revived), plus the operator's side: a chunk that does not fit defers on the
admission trigger without creating a batch, and resumes once, admitted, when the batch ahead ends.
The trigger itself is tested in ``test_admission_trigger.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from anthropic_batch import queue_budget
from anthropic_batch.admission_trigger import AdmissionTrigger
from anthropic_batch.queue_budget import QueueBudgetError, TicketQueue, acquire
from anthropic_batch.sensors import raise_for_admission_event
from anthropic_batch.triggers import BatchPollTrigger
from tests.plugins.anthropic_batch._operator_context import make_context
from tests.plugins.anthropic_batch.test_hooks import make_chunk, sdk_client, use_emulator
from tests.plugins.anthropic_batch.test_submit import write_manifest


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_deployment_budget(monkeypatch):
    monkeypatch.delenv(queue_budget.DEPLOYMENT_BUDGET_ENV, raising=False)
    monkeypatch.setattr(queue_budget, "_variable_budget", lambda: None)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(tmp_path, clock) -> TicketQueue:
    return TicketQueue(tmp_path / "root", clock=clock)


def ledger_file(tmp_path: Path, name: str, **entry) -> str:
    path = tmp_path / "ledger" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry:
        path.write_text(json.dumps(entry))
    return str(path)


def take(queue, tmp_path, name, n, *, pipeline="p", pipeline_budget=100, budget=None, owner=None):
    return acquire(
        queue,
        owner=owner or f"owner-{name}",
        ledger_path=ledger_file(tmp_path, name),
        n_requests=n,
        pipeline=pipeline,
        pipeline_budget=pipeline_budget,
        budget=budget,
    )


def test_fifo_within_pipeline_budget(queue, tmp_path):
    a, adm_a = take(queue, tmp_path, "a", 60)
    b, adm_b = take(queue, tmp_path, "b", 50)
    c, adm_c = take(queue, tmp_path, "c", 10)  # would fit (60 + 10) but waits behind b: strict FIFO
    assert (a["seq"], b["seq"], c["seq"]) == (1, 2, 3)
    assert adm_a.admitted and not adm_b.admitted and not adm_c.admitted
    assert adm_c.ahead_pipeline_requests == 110
    queue.release_owned("owner-a", a["ledger_path"])
    assert take(queue, tmp_path, "b", 50)[1].admitted
    assert take(queue, tmp_path, "c", 10)[1].admitted  # 50 + 10 <= 100
    # admission is final: the ticket is marked, and the same owner finds the same ticket again
    again, admission = take(queue, tmp_path, "b", 50)
    assert again["seq"] == 2 and again["admitted_at"] and admission.admitted


def test_pipelines_have_own_budgets_and_share_the_deployment_one(queue, tmp_path):
    _, x1 = take(queue, tmp_path, "x1", 100, pipeline="x", budget=150)
    _, y1 = take(queue, tmp_path, "y1", 40, pipeline="y", pipeline_budget=50, budget=150)
    _, y2 = take(queue, tmp_path, "y2", 20, pipeline="y", pipeline_budget=50, budget=150)
    assert x1.admitted and y1.admitted
    assert not y2.admitted and y2.ahead_pipeline_requests == 40 and y2.ahead_requests == 140
    # without a deployment budget, pipeline x's chunk does not hold pipeline y back
    _, y2_alone = take(queue, tmp_path, "y2", 20, pipeline="y", pipeline_budget=50, budget=None)
    assert not y2_alone.admitted  # 40 + 20 > 50 still: the pipeline budget
    queue.release_owned("owner-y1", ledger_file(tmp_path, "y1"))
    assert take(queue, tmp_path, "y2", 20, pipeline="y", pipeline_budget=50, budget=150)[1].admitted


def test_chunk_bigger_than_a_budget_fails_clearly(queue, tmp_path):
    with pytest.raises(QueueBudgetError, match="can never fit"):
        take(queue, tmp_path, "big", 101)
    with pytest.raises(QueueBudgetError, match="deployment: 50"):
        take(queue, tmp_path, "big2", 60, budget=50)


def test_liveness_follows_the_ledger_and_heartbeats(queue, tmp_path, clock):
    lease = queue.lease_seconds
    # a: its batch is running (ledger) -> counts even with a stale heartbeat
    a, _ = take(queue, tmp_path, "a", 50)
    ledger_file(tmp_path, "a", batch_id="msgbatch_a", state="submitted")
    # b: admitted, then its task died before creating anything -> stops counting after the lease
    b, _ = take(queue, tmp_path, "b", 50)
    clock.now += lease + 1
    assert queue.is_live(a) and not queue.is_live(b)
    # c: waits behind a (50 + 60 > 100)
    _, c = take(queue, tmp_path, "c", 60)
    assert not c.admitted and c.ahead_requests == 50
    # a's batch ended (any waiter records it in the ledger) -> a no longer counts, c gets in
    ledger_file(tmp_path, "a", batch_id="msgbatch_a", state="ended", ended_at="2026-11-01T00:00:00Z")
    assert take(queue, tmp_path, "c", 60)[1].admitted


def test_stale_running_ticket_is_checked_against_the_api(tmp_path, clock):
    ended: set[str] = set()
    queue = TicketQueue(tmp_path / "root", clock=clock, batch_ended=lambda batch_id: batch_id in ended)
    a, _ = take(queue, tmp_path, "a", 80)
    ledger_file(tmp_path, "a", batch_id="msgbatch_a", state="submitted")
    clock.now += queue.lease_seconds + 1
    assert queue.is_live(a)  # still running per the API
    ended.add("msgbatch_a")  # ended, but nobody is left to record it
    assert not queue.is_live(a)
    flaky = TicketQueue(tmp_path / "root", clock=clock, batch_ended=lambda _id: 1 / 0)
    assert flaky.is_live(a)  # unknown counts (the safe side)


def test_a_waiting_ticket_that_went_stale_queues_again_at_the_back(queue, tmp_path, clock):
    take(queue, tmp_path, "a", 100)
    b, adm_b = take(queue, tmp_path, "b", 50)
    assert not adm_b.admitted
    clock.now += queue.lease_seconds  # b's task was away: others stopped counting it
    take(queue, tmp_path, "c", 50)  # c is now ahead of b
    b2, _ = take(queue, tmp_path, "b", 50)
    assert b2["seq"] > b["seq"]
    assert json.loads((queue.dir / f"{b['seq']:012d}.json").read_text())["released_at"]


def test_a_retry_takes_over_its_own_ticket_instead_of_queueing_behind_it(queue, tmp_path):
    """A zombie try and its retry both took a ticket for one chunk (how a retry ended up "42
    requests live ahead, budget 30", behind itself): the chunk holds the first one, keeps its place,
    and the duplicate no longer counts."""
    ledger = ledger_file(tmp_path, "x")
    mine = {
        "owner": "owner-x",
        "ledger_path": ledger,
        "n_requests": 10,
        "pipeline": "p",
        "pipeline_budget": 30,
    }
    first = queue.take(**mine)
    take(queue, tmp_path, "y", 20, pipeline_budget=30)  # admitted: 10 + 20 <= 30
    duplicate = queue.take(**mine)
    ticket, admission = take(queue, tmp_path, "x", 10, pipeline_budget=30)
    assert ticket["seq"] == first["seq"] and admission.admitted
    assert admission.ahead_requests == 0
    unreleased = [t["seq"] for t in queue.tickets() if not t["released_at"]]
    assert unreleased == [first["seq"], 2] and duplicate["seq"] not in unreleased


def test_the_owner_is_the_chunk_task_not_the_run_or_the_try():
    """A retry (new try) or a rerun of the date (new run id) is the same owner: it takes over the ticket."""
    base = {
        "dag_id": "d",
        "run_id": "scheduled__2026-10-20",
        "task_id": "batch.submit",
        "map_index": 2,
        "partition": "2026-10-20",
        "pipeline": "p",
        "mode": "batch",
    }
    owner = queue_budget.ticket_owner(base)
    assert owner == queue_budget.ticket_owner({**base, "run_id": "backfill__2026-10-20"})
    assert owner != queue_budget.ticket_owner({**base, "partition": "2026-10-21"})
    assert owner != queue_budget.ticket_owner({**base, "map_index": 3})


def test_an_admitted_ticket_that_went_stale_is_not_revived(queue, tmp_path, clock):
    a, first = take(queue, tmp_path, "a", 60)  # admitted, then its task died before creating a batch
    assert first.admitted
    clock.now += queue.lease_seconds + 1  # the others stopped counting a
    _, b = take(queue, tmp_path, "b", 60)
    assert b.admitted
    a2, again = take(queue, tmp_path, "a", 60)  # a's retry comes back: behind b, not beside it
    assert a2["seq"] > a["seq"] and not again.admitted and again.ahead_requests == 60


def test_a_ticket_whose_ledger_intent_is_fresh_is_not_given_up(queue, tmp_path, clock):
    """The owner is inside submit_idempotently (the intent beats): the ticket still counts, so a
    retry must not re-queue (the batch being created would run uncounted)."""
    a, _ = take(queue, tmp_path, "a", 60)
    clock.now += queue.lease_seconds
    stamp = datetime.fromtimestamp(clock.now, UTC).isoformat()
    ledger_file(tmp_path, "a", state="intent", heartbeat_at=stamp)
    assert queue.is_live(a) and not queue.owner_stale(a)
    assert take(queue, tmp_path, "a", 60)[0]["seq"] == a["seq"]


def test_concurrent_tries_of_one_chunk_hold_one_ticket(tmp_path):
    queue = TicketQueue(tmp_path / "root")
    ledger = ledger_file(tmp_path, "x")
    barrier = threading.Barrier(8)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        ticket, _ = acquire(
            queue, owner="o", ledger_path=ledger, n_requests=5, pipeline="p", pipeline_budget=10, budget=None
        )
        with lock:
            seqs.append(ticket["seq"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seqs)) == 1
    assert [t["seq"] for t in queue.tickets() if not t["released_at"]] == seqs[:1]


def test_a_late_beat_never_revives_a_released_ticket(queue, tmp_path):
    a, _ = take(queue, tmp_path, "a", 10)
    queue.release(a)
    assert queue.beat(a)["released_at"]  # e.g. a trigger of an earlier try beating after the release
    assert not queue.is_live(queue.tickets()[0])


def test_concurrent_takers_get_distinct_gap_free_numbers(tmp_path):
    queue = TicketQueue(tmp_path / "root")
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        ticket = queue.take(
            owner=f"o{i}", ledger_path=f"/l/{i}", n_requests=1, pipeline="p", pipeline_budget=100
        )
        with lock:
            seqs.append(ticket["seq"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seqs) == list(range(1, 17))


def test_released_tickets_are_pruned_but_numbers_never_reused(queue, tmp_path, clock):
    for name in "abc":
        ticket, _ = take(queue, tmp_path, name, 10)
        queue.release(ticket)
    clock.now += queue_budget.PRUNE_AFTER + 1
    queue.prune()
    assert [t["seq"] for t in queue.tickets()] == [3]
    assert take(queue, tmp_path, "d", 10)[0]["seq"] == 4


def test_random_interleavings_never_exceed_either_budget(tmp_path, clock):
    """Property: whatever the order of takes, checks and batch ends, the admitted requests whose
    batches are in progress stay within the pipeline budgets and the deployment budget."""
    rng = random.Random(9)
    budgets = {"x": 100, "y": 60}
    deployment = 120
    for trial in range(5):
        queue = TicketQueue(tmp_path / f"root{trial}", clock=clock)
        waiting = {f"t{i}": (rng.choice("xy"), rng.choice([10, 20, 40, 60])) for i in range(30)}
        running: dict[str, tuple[str, int]] = {}
        peak = 0
        for _ in range(400):
            if running and rng.random() < 0.3:
                name = rng.choice(sorted(running))
                running.pop(name)
                ledger_file(tmp_path, f"{trial}-{name}", batch_id=name, state="ended", ended_at="x")
            elif waiting:
                name = rng.choice(sorted(waiting))
                pipeline, n = waiting[name]
                _, admission = take(
                    queue,
                    tmp_path,
                    f"{trial}-{name}",
                    n,
                    pipeline=pipeline,
                    pipeline_budget=budgets[pipeline],
                    budget=deployment,
                )
                if admission.admitted:
                    waiting.pop(name)
                    running[name] = (pipeline, n)
                    ledger_file(tmp_path, f"{trial}-{name}", batch_id=name, state="submitted")
            clock.now += 1
            total = sum(n for _, n in running.values())
            peak = max(peak, total)
            assert total <= deployment
            for pipeline, budget in budgets.items():
                assert sum(n for p, n in running.values() if p == pipeline) <= budget
        assert peak > 60  # the budget was actually used, not just never reached


def test_deployment_budget_from_env(monkeypatch):
    monkeypatch.setenv(queue_budget.DEPLOYMENT_BUDGET_ENV, "5000")
    assert queue_budget.deployment_budget() == 5000
    monkeypatch.setenv(queue_budget.DEPLOYMENT_BUDGET_ENV, "lots")
    with pytest.raises(QueueBudgetError, match=queue_budget.DEPLOYMENT_BUDGET_VARIABLE):
        queue_budget.deployment_budget()
    monkeypatch.delenv(queue_budget.DEPLOYMENT_BUDGET_ENV)
    assert queue_budget.deployment_budget() is None


# -- the operator's side: SubmitBatchOperator(wait=True, queue_budget_requests=...) -----------------------
@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    emu.conn_id = use_emulator(monkeypatch, emu, "budget_emu")
    return emu


def test_submit_waits_for_admission_and_holds_the_budget_until_its_batch_ends(emu, tmp_path):
    from anthropic_batch.operators.submit import SubmitBatchOperator

    work, root = tmp_path / "work", tmp_path / "root"
    chunks = [make_chunk(work, 4, index=0), make_chunk(work, 4, index=1, prefix="s")]
    write_manifest(work, chunks)

    def op(chunk):
        return SubmitBatchOperator(
            task_id="submit",
            chunk_path=chunk["path"],
            work_dir=str(work),
            storage_root=str(root),
            conn_id=emu.conn_id,
            wait=True,
            queue_budget_requests=5,  # one chunk of 4 at a time
            queue_root=str(root),
            poll_interval=0.1,
            admission_poll_seconds=0.1,
        )

    first, second = make_context(task_id="submit", map_index=0), make_context(task_id="submit", map_index=1)
    with pytest.raises(TaskDeferred) as waiting_batch:
        op(chunks[0]).execute(first)
    assert isinstance(waiting_batch.value.trigger, BatchPollTrigger)
    assert waiting_batch.value.method_name == "wait_complete"
    with pytest.raises(TaskDeferred) as waiting_admission:
        op(chunks[1]).execute(second)
    trigger = waiting_admission.value.trigger
    assert isinstance(trigger, AdmissionTrigger)
    assert waiting_admission.value.method_name == "admission_complete"
    assert trigger.max_poll_interval == queue_budget.ADMISSION_MAX_POLL_SECONDS  # not the batch poll
    assert len(list(sdk_client(emu).messages.batches.list())) == 1  # the second chunk created nothing

    # The first batch ends: its task resumes, records the end, releases its ticket.
    batch_id = waiting_batch.value.trigger.batch_id
    client = sdk_client(emu)
    deadline = datetime.now(UTC).timestamp() + 30
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert datetime.now(UTC).timestamp() < deadline, "the emulator batch did not end"
        time.sleep(0.1)  # polling the emulator, bounded by the deadline
    event = {"status": "ended", "batch_id": batch_id, "batch": batch.model_dump(mode="json")}
    handle = op(chunks[0]).wait_complete(first, event)
    assert handle["batch_id"] == batch_id
    tickets = TicketQueue(root).tickets()
    assert [bool(t["released_at"]) for t in tickets] == [True, False]  # the first one, by its owner
    # The admission trigger (in the triggerer) sees the second ticket admitted; the task resumes once,
    # creates its batch and waits for it in the same task.
    admitted = asyncio.run(AdmissionTrigger(**trigger.serialize()[1]).run().__anext__()).payload
    assert admitted["status"] == "admitted" and admitted["seq"] == tickets[1]["seq"]
    with pytest.raises(TaskDeferred) as second_batch:
        op(chunks[1]).admission_complete(second, admitted)
    assert isinstance(second_batch.value.trigger, BatchPollTrigger)
    assert len(list(sdk_client(emu).messages.batches.list())) == 2


def test_a_retried_or_rerun_submit_takes_over_its_waiting_ticket(emu, tmp_path):
    """A new try, and a rerun of the date (new run id), of a chunk that waits for admission defer on
    the same ticket: no second ticket, the place in the queue is kept."""
    from anthropic_batch.operators.submit import SubmitBatchOperator

    work, root = tmp_path / "work", tmp_path / "root"
    chunks = [make_chunk(work, 4, index=0), make_chunk(work, 4, index=1, prefix="s")]
    write_manifest(work, chunks)

    def op(chunk):
        return SubmitBatchOperator(
            task_id="submit",
            chunk_path=chunk["path"],
            work_dir=str(work),
            storage_root=str(root),
            conn_id=emu.conn_id,
            wait=True,
            queue_budget_requests=5,
            queue_root=str(root),
            poll_interval=0.1,
        )

    with pytest.raises(TaskDeferred):
        op(chunks[0]).execute(make_context(task_id="submit", map_index=0))
    tries = [
        make_context(task_id="submit", map_index=1),
        make_context(task_id="submit", map_index=1, try_number=2),
        make_context(task_id="submit", map_index=1, run_id="backfill__2026-11-01T00:00:00+00:00"),
    ]
    for context in tries:
        with pytest.raises(TaskDeferred) as waiting:
            op(chunks[1]).execute(context)
        assert isinstance(waiting.value.trigger, AdmissionTrigger)
    tickets = TicketQueue(root).tickets()
    assert [(t["seq"], bool(t["released_at"])) for t in tickets] == [(1, False), (2, False)]
    assert len(list(sdk_client(emu).messages.batches.list())) == 1


def test_admission_event_errors_fail_the_task_clearly():
    raise_for_admission_event({"status": "admitted", "seq": 3})
    raise_for_admission_event(None)  # dag.test may resume without an event
    with pytest.raises(AirflowFailException, match="can never fit"):
        raise_for_admission_event(
            {
                "status": "error",
                "message": "A chunk of 9 requests can never fit",
                "error_type": "QueueBudgetError",
            }
        )
    with pytest.raises(Exception, match="kept failing"):
        raise_for_admission_event({"status": "error", "message": "kept failing", "error_type": "OSError"})
