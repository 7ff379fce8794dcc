"""Queue budget admission: tickets in storage, first in first out, across every run and pipeline.

A batch's requests count against two limits while the batch is in progress: its pipeline's
``queue_budget_requests`` and, optionally, a deployment-wide budget (Airflow Variable
``anthropic_batch_queue_budget_requests`` or env ``ANTHROPIC_BATCH_QUEUE_BUDGET_REQUESTS``). A pool
cannot express two limits for one task, so before it creates a batch a task takes a **ticket**:

- ``{root}/_queue/tickets/{seq:012d}.json`` created with :func:`storage.create_if_absent` (exclusive
  create, a conditional put on object stores); ``seq`` is max(listed)+1, retried on conflict, so the
  tickets form one total order. A ticket holds ``n_requests``, the pipeline, its budget, the ledger
  entry of the chunk it is for, its owner (the task instance) and a heartbeat.
- A ticket is **admitted** when the live tickets before it plus itself fit: all of them within the
  deployment budget, and those of its pipeline within the pipeline budget. Tickets before it that
  are not admitted yet count too (strict FIFO: a big chunk is not starved by small ones). A ticket
  that is not admitted is re-checked later (the task defers meanwhile, without a worker slot).
- A ticket is **live** until it is released (its owner saw the batch end), its batch ended by its
  ledger entry (any waiter records that), or, while it has no batch, its heartbeat (or the ledger
  intent's) is older than ``lease_seconds``: a dead task does not block the queue. A stale ticket
  whose batch the ledger still shows running is checked against the API (``batch_ended``) so a
  batch nobody waits for any more is not counted forever.

Why it holds: liveness is monotone (a ticket that expired is never revived: its owner re-queues at
the back with a new ticket), and a ticket created later gets a larger ``seq``. So for the admitted
live ticket with the largest ``seq``, every live admitted ticket was before it (or it) when it was
admitted, and their sum fitted then; it only shrank since. Per pipeline the same argument applies
to the pipeline's largest admitted ticket. Known limit: clocks must agree within a fraction of the
lease (heartbeats are wall-clock timestamps written by different hosts).

Released tickets are pruned after :data:`PRUNE_AFTER` (never the highest ``seq``, so numbers are
never reused).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from anthropic_batch import storage
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.ledger import LedgerState
from anthropic_batch.status import DEFAULT_CONN_ID
from anthropic_batch.storage import PathLike, as_path

log = logging.getLogger(__name__)

QUEUE_DIR = "_queue"
TICKETS_DIR = "tickets"
#: Airflow Variable / env var with the deployment-wide budget (requests in progress, all pipelines).
DEPLOYMENT_BUDGET_VARIABLE = "anthropic_batch_queue_budget_requests"
DEPLOYMENT_BUDGET_ENV = "ANTHROPIC_BATCH_QUEUE_BUDGET_REQUESTS"
#: A ticket without a batch whose heartbeat is older than this belongs to a dead task.
LEASE_SECONDS = 600.0
#: Released tickets older than this are deleted (listing stays short).
PRUNE_AFTER = 3600.0
#: Attempts at taking a sequence number before giving up (each conflict means another writer won).
MAX_CREATE_ATTEMPTS = 50


class QueueBudgetError(AnthropicBatchError, ValueError):
    """A chunk that can never be admitted (bigger than a budget)."""


def queue_dir(root: PathLike | None = None) -> Any:
    """``{root}/_queue/tickets``; ``root`` defaults to the deployment's storage root."""
    base = as_path(root) if root is not None else storage.storage_root()
    return base / QUEUE_DIR / TICKETS_DIR


def _variable_budget() -> str | None:
    try:
        from airflow.sdk import Variable

        return Variable.get(DEPLOYMENT_BUDGET_VARIABLE, default=None)
    except Exception as exc:  # outside a task (no API server): no deployment budget
        log.debug("Variable %s not readable: %s", DEPLOYMENT_BUDGET_VARIABLE, exc)
        return None


def deployment_budget() -> int | None:
    """The deployment-wide budget: env ``ANTHROPIC_BATCH_QUEUE_BUDGET_REQUESTS``, else the Variable."""
    raw = os.environ.get(DEPLOYMENT_BUDGET_ENV) or _variable_budget()
    if raw is None or not str(raw).strip():
        return None
    try:
        value = int(str(raw).strip())
    except ValueError as err:
        raise QueueBudgetError(
            f"{DEPLOYMENT_BUDGET_VARIABLE} / {DEPLOYMENT_BUDGET_ENV} must be a whole number of requests, "
            f"got {raw!r}"
        ) from err
    if value < 1:
        raise QueueBudgetError(f"{DEPLOYMENT_BUDGET_VARIABLE} must be >= 1, got {value}")
    return value


def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Admission:
    """The outcome of one check: admitted or not, and what is ahead (for the log)."""

    admitted: bool
    seq: int
    ahead_requests: int
    ahead_pipeline_requests: int
    budget: int | None
    pipeline_budget: int

    def describe(self, n_requests: int) -> str:
        state = "admitted" if self.admitted else "waiting"
        budget = f"{self.budget}" if self.budget is not None else "none"
        return (
            f"ticket {self.seq} ({n_requests} requests) {state}: {self.ahead_requests} requests live "
            f"ahead in the deployment (budget {budget}), {self.ahead_pipeline_requests} in the "
            f"pipeline (budget {self.pipeline_budget})"
        )


class TicketQueue:
    """The ticket directory of one deployment. ``batch_ended(batch_id)`` asks the API (optional)."""

    def __init__(
        self,
        root: PathLike | None = None,
        *,
        lease_seconds: float = LEASE_SECONDS,
        batch_ended: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = _now,
    ) -> None:
        self.dir = queue_dir(root)
        self.lease_seconds = lease_seconds
        self.batch_ended = batch_ended
        self.clock = clock

    # -- files ---------------------------------------------------------------------------------
    def _path(self, seq: int) -> Any:
        return self.dir / f"{seq:012d}.json"

    def _seqs(self) -> list[int]:
        if not self.dir.exists():
            return []
        seqs = []
        for path in self.dir.iterdir():
            name = path.name
            if name.endswith(".json") and name[:-5].isdigit() and storage.TMP_MARKER not in name:
                seqs.append(int(name[:-5]))
        return sorted(seqs)

    def tickets(self) -> list[dict[str, Any]]:
        """Every ticket, in queue order."""
        found = []
        for seq in self._seqs():
            ticket = storage.read_json(self._path(seq))
            if ticket:
                found.append({**ticket, "seq": seq})
        return found

    def _write(self, ticket: dict[str, Any]) -> None:
        # Only the owner writes its ticket after creating it, so a plain atomic replace is enough.
        storage.atomic_write_json(self._path(int(ticket["seq"])), ticket)

    # -- liveness ------------------------------------------------------------------------------
    def _age(self, stamp: Any) -> float:
        if not stamp:
            return float("inf")
        try:
            when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return float("inf")
        return self.clock() - when

    def is_live(self, ticket: dict[str, Any]) -> bool:
        """Does ``ticket`` still count against the budget? (see the module docstring)"""
        if ticket.get("released_at"):
            return False
        entry = storage.read_json(ticket["ledger_path"]) if ticket.get("ledger_path") else None
        batch_id = (entry or {}).get("batch_id")
        fresh = self._age(ticket.get("heartbeat_at")) <= self.lease_seconds
        if batch_id and batch_id != ticket.get("after_batch_id"):
            if entry.get("state") == LedgerState.ENDED or entry.get("ended_at"):
                return False
            if fresh or self.batch_ended is None:
                return True
            try:
                return not self.batch_ended(batch_id)
            except Exception as err:  # unknown: count it (the safe side)
                log.warning("Could not check batch %s of ticket %s: %s", batch_id, ticket.get("seq"), err)
                return True
        if fresh:
            return True
        # The ledger intent's heartbeat: the owner is inside submit_idempotently right now.
        intent_age = self._age((entry or {}).get("heartbeat_at"))
        return bool(entry) and not batch_id and intent_age <= self.lease_seconds

    # -- the owner's side ---------------------------------------------------------------------
    def find(self, owner: str, ledger_path: str) -> dict[str, Any] | None:
        """The owner's unreleased ticket for ``ledger_path`` (a resumed or retried task finds it)."""
        for ticket in reversed(self.tickets()):
            if ticket.get("owner") == owner and ticket.get("ledger_path") == ledger_path:
                return None if ticket.get("released_at") else ticket
        return None

    def take(
        self,
        *,
        owner: str,
        ledger_path: str,
        n_requests: int,
        pipeline: str,
        pipeline_budget: int,
        after_batch_id: str | None = None,
    ) -> dict[str, Any]:
        """A new ticket at the back of the queue."""
        now = _iso(self.clock())
        ticket = {
            "owner": owner,
            "ledger_path": ledger_path,
            "n_requests": int(n_requests),
            "pipeline": pipeline,
            "pipeline_budget": int(pipeline_budget),
            "after_batch_id": after_batch_id,
            "created_at": now,
            "heartbeat_at": now,
            "admitted_at": None,
            "released_at": None,
        }
        for _ in range(MAX_CREATE_ATTEMPTS):
            seqs = self._seqs()
            seq = (seqs[-1] if seqs else 0) + 1
            body = {**ticket, "seq": seq}
            if storage.create_if_absent(self._path(seq), json.dumps(body, sort_keys=True).encode()):
                return body
        raise RuntimeError(f"Could not take a queue ticket in {self.dir} after {MAX_CREATE_ATTEMPTS} tries")

    def check(self, ticket: dict[str, Any], budget: int | None) -> Admission:
        """Is ``ticket`` admitted now? (Admission is final: once admitted it stays admitted.)"""
        seq = int(ticket["seq"])
        n = int(ticket["n_requests"])
        pipeline_budget = int(ticket["pipeline_budget"])
        if n > pipeline_budget or (budget is not None and n > budget):
            raise QueueBudgetError(
                f"A chunk of {n} requests can never fit the queue budget (pipeline {ticket['pipeline']}: "
                f"{pipeline_budget}, deployment: {budget}); lower max_requests_per_chunk or raise the budget."
            )
        ahead = ahead_pipeline = 0
        for other in self.tickets():
            if other["seq"] >= seq or not self.is_live(other):
                continue
            ahead += int(other["n_requests"])
            if other.get("pipeline") == ticket["pipeline"]:
                ahead_pipeline += int(other["n_requests"])
        admitted = bool(ticket.get("admitted_at")) or (
            ahead_pipeline + n <= pipeline_budget and (budget is None or ahead + n <= budget)
        )
        return Admission(admitted, seq, ahead, ahead_pipeline, budget, pipeline_budget)

    def expired(self, ticket: dict[str, Any]) -> bool:
        """Has the owner's own ticket gone stale (others may already have stopped counting it)?

        Half a lease of margin: the owner gives up before any observer does.
        """
        stale = self._age(ticket.get("heartbeat_at")) > self.lease_seconds / 2
        return not ticket.get("admitted_at") and stale

    def beat(self, ticket: dict[str, Any], **fields: Any) -> dict[str, Any]:
        updated = {**ticket, **fields, "heartbeat_at": _iso(self.clock())}
        self._write(updated)
        return updated

    def admit(self, ticket: dict[str, Any]) -> dict[str, Any]:
        return self.beat(ticket, admitted_at=_iso(self.clock()))

    def release(self, ticket: dict[str, Any]) -> dict[str, Any]:
        updated = {**ticket, "released_at": _iso(self.clock())}
        self._write(updated)
        return updated

    def release_owned(self, owner: str, ledger_path: str) -> int:
        """Release every unreleased ticket of ``owner`` for ``ledger_path``; how many."""
        released = 0
        for ticket in self.tickets():
            mine = ticket.get("owner") == owner and ticket.get("ledger_path") == ledger_path
            if mine and not ticket.get("released_at"):
                self.release(ticket)
                released += 1
        self.prune()
        return released

    def prune(self) -> None:
        """Delete released tickets older than :data:`PRUNE_AFTER`, never the highest one."""
        tickets = self.tickets()
        for ticket in tickets[:-1]:
            if ticket.get("released_at") and self._age(ticket["released_at"]) > PRUNE_AFTER:
                with contextlib.suppress(FileNotFoundError):
                    self._path(int(ticket["seq"])).unlink()

    def live_requests(self) -> Iterator[tuple[str, int]]:
        """(pipeline, n_requests) of every live ticket (for the UI and tests)."""
        for ticket in self.tickets():
            if self.is_live(ticket):
                yield str(ticket.get("pipeline")), int(ticket["n_requests"])


def acquire(
    queue: TicketQueue,
    *,
    owner: str,
    ledger_path: str,
    n_requests: int,
    pipeline: str,
    pipeline_budget: int,
    budget: int | None,
    after_batch_id: str | None = None,
) -> tuple[dict[str, Any], Admission]:
    """Find or take the owner's ticket for ``ledger_path``, beat it and check it.

    Returns the ticket (marked admitted when it is) and the admission. A ticket of ours that went
    stale (the task was away longer than half a lease) is released and replaced at the back.
    """
    ticket = queue.find(owner, ledger_path)
    if ticket is not None and queue.expired(ticket):
        log.warning("Queue ticket %s went stale; queueing again at the back.", ticket["seq"])
        queue.release(ticket)
        ticket = None
    if ticket is None:
        ticket = queue.take(
            owner=owner,
            ledger_path=ledger_path,
            n_requests=n_requests,
            pipeline=pipeline,
            pipeline_budget=pipeline_budget,
            after_batch_id=after_batch_id,
        )
    else:
        ticket = queue.beat(ticket)
    admission = queue.check(ticket, budget)
    if admission.admitted and not ticket.get("admitted_at"):
        ticket = queue.admit(ticket)
    return ticket, admission


def ticket_owner(identity: dict[str, Any]) -> str:
    """Who holds a queue ticket: one task instance (a resumed or retried try finds its ticket)."""
    return "/".join(str(identity[k]) for k in ("dag_id", "run_id", "task_id", "map_index"))


def admit_or_defer(
    operator: Any,
    *,
    ledger_path: str,
    identity: dict[str, Any],
    n_requests: int,
    pipeline_budget: int | None,
    admission_poll_seconds: float,
    method_name: str,
    queue_root: str | None = None,
    conn_id: str = DEFAULT_CONN_ID,
) -> None:
    """Take or re-check this chunk's queue ticket; defer (and come back to ``method_name``) until
    it is admitted. Returns when admitted, or at once when no budget is configured."""
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import BatchHook

    budget = deployment_budget()
    if pipeline_budget is None and budget is None:
        return
    pipeline_budget = pipeline_budget if pipeline_budget is not None else budget
    assert pipeline_budget is not None
    entry = storage.read_json(ledger_path) or {}

    def batch_ended(batch_id: str) -> bool:
        # status.BatchStatus is the provider's: loading it imports the anthropic SDK
        from anthropic_batch.status import BatchStatus

        return BatchHook(conn_id=conn_id).get_batch(batch_id).processing_status == BatchStatus.ENDED

    queue = TicketQueue(queue_root, batch_ended=batch_ended)
    try:
        _, admission = acquire(
            queue,
            owner=ticket_owner(identity),
            ledger_path=ledger_path,
            n_requests=n_requests,
            pipeline=identity["pipeline"],
            pipeline_budget=pipeline_budget,
            budget=budget,
            after_batch_id=entry.get("batch_id"),
        )
    except QueueBudgetError as err:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(err)) from err
    operator.log.info("Queue budget: %s.", admission.describe(n_requests))
    if admission.admitted:
        return
    # Airflow's module only on this path: callers that never take it stay light
    from airflow.providers.standard.triggers.temporal import DateTimeTrigger

    recheck = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=admission_poll_seconds)
    operator.defer(
        trigger=DateTimeTrigger(moment=recheck),
        method_name=method_name,
    )
