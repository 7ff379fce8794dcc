"""AdmissionTrigger: wait in the triggerer for a queue ticket to be admitted.

A chunk that does not fit the queue budget yet (:mod:`anthropic_batch.queue_budget`) defers on this
trigger instead of resuming a worker per check. The trigger re-checks the ticket queue in storage,
starting at ``poll_interval`` and growing by half (with jitter) toward ``max_poll_interval`` while
nothing ahead of it changes (a change resets it), and on every check beats the ticket, so a long wait
in the triggerer keeps the ticket's place. A crashed triggerer stops beating: after the lease the
ticket stops counting for the others, and when the trigger runs again (restarted from its kwargs)
it finds its ticket stale and queues again at the back; a trigger that dies for good leaves a ticket
that simply expires. Exactly one event is yielded:

- ``{"status": "admitted", "seq", "message"}``: the task resumes and creates its batch;
- ``{"status": "attached", "batch_id"}``: another try of the chunk created its batch meanwhile (the
  task resumes and re-attaches to it, no admission needed);
- ``{"status": "timeout", "message"}`` past ``deadline`` (epoch seconds; None: no limit);
- ``{"status": "error", "message", "error_type"}``: the chunk can never fit (``QueueBudgetError``),
  or storage kept failing for ``max_transient_seconds``.

Storage calls are blocking, so each check runs in a thread (``sync_to_async``, the pattern Airflow
documents for triggers: a connection lookup inside it still reaches the triggerer's supervisor).
Only plain values are in the kwargs (no secrets: the connection id, never the key). The module
lives in the plugins folder so the triggerer imports it by ``CLASSPATH``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from anthropic_batch import queue_budget, storage
from anthropic_batch.status import DEFAULT_CONN_ID
from anthropic_batch.triggers import DEFAULT_MAX_TRANSIENT_SECONDS, jittered, next_interval

CLASSPATH = "anthropic_batch.admission_trigger.AdmissionTrigger"


class AdmissionEvent(StrEnum):
    """The ``status`` of the one event an :class:`AdmissionTrigger` yields."""

    ADMITTED = "admitted"
    ATTACHED = "attached"
    TIMEOUT = "timeout"
    ERROR = "error"


class AdmissionTrigger(BaseTrigger):
    """
    Wait until the owner's queue ticket for ``ledger_path`` is admitted (see the module docstring).

    :param owner: the ticket owner (:func:`anthropic_batch.queue_budget.ticket_owner`).
    :param ledger_path: the chunk's ledger entry (the ticket is the owner's for this entry).
    :param n_requests, pipeline, pipeline_budget: the chunk, for a new ticket if it must re-queue.
    :param budget: the deployment-wide budget read by the task (None: none).
    :param after_batch_id: the batch the entry had when the task deferred (a fully canceled one
        being replaced); a different batch id in the entry means another try created the batch.
    :param queue_root: storage root of the ticket queue (None: the deployment's storage root).
    :param conn_id: the Anthropic connection, to check whether a stale ticket's batch ended.
    :param poll_interval: first (and minimum) seconds between checks.
    :param max_poll_interval: the interval grows toward this while nothing ahead changes.
    :param lease_seconds: the ticket lease (beats happen at least every quarter lease).
    :param deadline: wall-clock epoch seconds after which the trigger gives up (None: never).
    :param max_transient_seconds: how long storage may keep failing before an ``error`` event.
    """

    def __init__(
        self,
        owner: str,
        ledger_path: str,
        n_requests: int,
        pipeline: str,
        pipeline_budget: int,
        budget: int | None = None,
        after_batch_id: str | None = None,
        queue_root: str | None = None,
        conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = queue_budget.ADMISSION_POLL_SECONDS,
        max_poll_interval: float = queue_budget.ADMISSION_MAX_POLL_SECONDS,
        lease_seconds: float = queue_budget.LEASE_SECONDS,
        deadline: float | None = None,
        max_transient_seconds: float = DEFAULT_MAX_TRANSIENT_SECONDS,
    ) -> None:
        super().__init__()
        self.owner = owner
        self.ledger_path = ledger_path
        self.n_requests = int(n_requests)
        self.pipeline = pipeline
        self.pipeline_budget = int(pipeline_budget)
        self.budget = int(budget) if budget is not None else None
        self.after_batch_id = after_batch_id
        self.queue_root = queue_root
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = max(float(max_poll_interval), self.poll_interval)
        self.lease_seconds = float(lease_seconds)
        self.deadline = float(deadline) if deadline is not None else None
        self.max_transient_seconds = float(max_transient_seconds)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "owner": self.owner,
                "ledger_path": self.ledger_path,
                "n_requests": self.n_requests,
                "pipeline": self.pipeline,
                "pipeline_budget": self.pipeline_budget,
                "budget": self.budget,
                "after_batch_id": self.after_batch_id,
                "queue_root": self.queue_root,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "lease_seconds": self.lease_seconds,
                "deadline": self.deadline,
                "max_transient_seconds": self.max_transient_seconds,
            },
        )

    def _queue(self) -> queue_budget.TicketQueue:
        return queue_budget.TicketQueue(
            self.queue_root,
            lease_seconds=self.lease_seconds,
            batch_ended=queue_budget.batch_ended_checker(self.conn_id),
        )

    def check(self) -> tuple[str, Any]:
        """One blocking check: ``("attached", batch_id)`` or ``("checked", Admission)``."""
        entry = storage.read_json(self.ledger_path) or {}
        batch_id = entry.get("batch_id")
        if batch_id and batch_id != self.after_batch_id:
            return "attached", batch_id
        _, admission = queue_budget.acquire(
            self._queue(),
            owner=self.owner,
            ledger_path=self.ledger_path,
            n_requests=self.n_requests,
            pipeline=self.pipeline,
            pipeline_budget=self.pipeline_budget,
            budget=self.budget,
            after_batch_id=self.after_batch_id,
        )
        return "checked", admission

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield await self._wait()

    async def _wait(self) -> TriggerEvent:
        from asgiref.sync import sync_to_async

        check = sync_to_async(self.check, thread_sensitive=False)
        interval = self.poll_interval
        last_ahead: tuple[int, int, int] | None = None
        failing_since: float | None = None
        while True:
            try:
                kind, outcome = await check()
            except queue_budget.QueueBudgetError as err:
                return self._event(AdmissionEvent.ERROR, message=str(err), error_type=type(err).__name__)
            except Exception as err:  # storage trouble: keep the wait alive for a while
                if failing_since is None:
                    failing_since = time.monotonic()
                failing_for = time.monotonic() - failing_since
                if failing_for > self.max_transient_seconds:
                    return self._event(
                        AdmissionEvent.ERROR,
                        message=f"Checking the ticket queue kept failing for {failing_for:.0f}s; last: "
                        f"{type(err).__name__}: {err}",
                        error_type=type(err).__name__,
                    )
                self.log.warning(
                    "Checking the ticket queue failed (%s: %s); will retry.", type(err).__name__, err
                )
            else:
                failing_since = None
                if kind == "attached":
                    self.log.info(
                        "Batch %s of %s exists already: no admission needed.", outcome, self.ledger_path
                    )
                    return self._event(AdmissionEvent.ATTACHED, batch_id=outcome)
                message = outcome.describe(self.n_requests)
                self.log.info("Queue budget: %s.", message)
                if outcome.admitted:
                    return self._event(AdmissionEvent.ADMITTED, seq=outcome.seq, message=message)
                ahead = (outcome.seq, outcome.ahead_requests, outcome.ahead_pipeline_requests)
                if last_ahead is not None:
                    interval = next_interval(
                        interval,
                        changed=ahead != last_ahead,
                        poll_interval=self.poll_interval,
                        max_poll_interval=self.max_poll_interval,
                    )
                last_ahead = ahead
            remaining = float("inf") if self.deadline is None else self.deadline - time.time()
            if remaining <= 0:
                await sync_to_async(self._queue().release_owned, thread_sensitive=False)(
                    self.owner, self.ledger_path
                )
                return self._event(
                    AdmissionEvent.TIMEOUT,
                    message=f"Not admitted by the deadline; the ticket for {self.ledger_path} is released.",
                )
            # Beat well inside the lease whatever the interval: the ticket keeps its place.
            await asyncio.sleep(jittered(min(interval, self.lease_seconds / 4), remaining))

    def _event(self, status: AdmissionEvent, **fields: Any) -> TriggerEvent:
        return TriggerEvent({"status": str(status), "ledger_path": self.ledger_path, **fields})
