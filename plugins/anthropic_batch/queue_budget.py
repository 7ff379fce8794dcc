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
  that is not admitted waits in the triggerer (:class:`~anthropic_batch.admission_trigger.AdmissionTrigger`,
  no worker slot): the trigger re-checks with its own backoff and beats the ticket on every check,
  and the task resumes once, when the ticket is admitted.
- A ticket is **live** until it is released (its owner saw the batch end), its batch ended by its
  ledger entry (any waiter records that), or, while it has no batch, its heartbeat (or the ledger
  intent's) is older than ``lease_seconds``: a dead task (or a dead triggerer) does not block the
  queue. A stale ticket whose batch the ledger still shows running is checked against the API
  (``batch_ended``) so a batch nobody waits for any more is not counted forever.
- A ticket's **owner** is the chunk's task: dag, partition, task and map index (:func:`ticket_owner`),
  not the run or the try. A retry, a zombie beside its retry, or a rerun of the date takes over the
  owner's ticket for the same ledger entry and keeps its place; duplicates (two tries taking a
  ticket at once) collapse to the lowest one. Only a ticket the owner finds stale (no beat for half a
  lease, the margin before observers drop it) is given up and replaced at the back.

Why it holds: liveness is monotone (a ticket that went stale is never revived: its owner re-queues
at the back with a new ticket, admitted or not), and a ticket created later gets a larger ``seq``. So
for the admitted live ticket with the largest ``seq``, every live admitted ticket was before it (or
it) when it was admitted, and their sum fitted then; it only shrank since. Per pipeline the same
argument applies to the pipeline's largest admitted ticket. Known limit: clocks must agree within a
fraction of the lease (heartbeats are wall-clock timestamps written by different hosts).

Released tickets are pruned after :data:`PRUNE_AFTER` (never the highest ``seq``, so numbers are
never reused).
"""

from __future__ import annotations

import contextlib
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
#: Env var: first seconds between admission checks in the triggerer (demos and tests shorten it).
ADMISSION_POLL_ENV = "ANTHROPIC_BATCH_ADMISSION_POLL_INTERVAL"
#: Default first and largest seconds between admission checks (independent of the batch poll).
ADMISSION_POLL_SECONDS = 5.0
ADMISSION_MAX_POLL_SECONDS = 60.0


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

    def _update(self, seq: int, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
        """Apply ``change`` to ticket ``seq`` by compare-and-swap; the ticket as stored afterwards.

        Several writers may hold one ticket (a try and its retry, a worker and a trigger): a released
        ticket is never written again (a late beat must not revive it), and no write is lost.
        Returns None when the ticket is gone.
        """
        path = self._path(seq)
        for _ in range(MAX_CREATE_ATTEMPTS):
            current = storage.read_with_version(path)
            if current is None:
                return None
            data, version = current
            ticket = {**json.loads(data), "seq": seq}
            if ticket.get("released_at"):
                return ticket
            updated = change(ticket)
            if storage.replace_if_version(path, json.dumps(updated, sort_keys=True).encode(), version):
                return updated
        raise RuntimeError(f"Could not update queue ticket {path} after {MAX_CREATE_ATTEMPTS} tries")

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
    def owner_stale(self, ticket: dict[str, Any]) -> bool:
        """Has the owner's own ticket gone stale (others may already have stopped counting it)?

        Half a lease of margin: the owner gives up before any observer does. Admitted or not: a
        ticket others stopped counting must not be revived, or the budget would not hold. The same
        signs of life as :meth:`is_live`: the ticket's heartbeat, the ledger intent's while there is no
        batch; a ticket whose batch exists counts until the batch ends.
        """
        entry = storage.read_json(ticket["ledger_path"]) if ticket.get("ledger_path") else None
        batch_id = (entry or {}).get("batch_id")
        if batch_id and batch_id != ticket.get("after_batch_id"):
            return False
        age = self._age(ticket.get("heartbeat_at"))
        if entry and not batch_id:
            age = min(age, self._age(entry.get("heartbeat_at")))
        return age > self.lease_seconds / 2

    def find(self, owner: str, ledger_path: str) -> dict[str, Any] | None:
        """The owner's ticket for ``ledger_path`` that a resumed, retried or re-run task takes over.

        The lowest unreleased ticket the owner has not let go stale; every other unreleased ticket of
        the owner for ``ledger_path`` (a zombie and its retry both took one, or a stale one) is
        released, so the chunk never queues behind itself. None when there is none to take over.
        """
        mine = [
            t
            for t in self.tickets()
            if t.get("owner") == owner and t.get("ledger_path") == ledger_path and not t.get("released_at")
        ]
        keep = next((t for t in mine if not self.owner_stale(t)), None)
        for ticket in mine:
            if ticket is not keep:
                if self.owner_stale(ticket):
                    log.warning("Queue ticket %s went stale; queueing again at the back.", ticket["seq"])
                else:
                    log.info("Queue ticket %s duplicates ticket %s of the same chunk; released.",
                             ticket["seq"], keep and keep["seq"])  # fmt: skip
                self.release(ticket)
        return keep

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

    def beat(self, ticket: dict[str, Any], **fields: Any) -> dict[str, Any] | None:
        """Refresh the heartbeat (and set ``fields``); the stored ticket, released or None if gone."""
        now = _iso(self.clock())
        return self._update(int(ticket["seq"]), lambda t: {**t, **fields, "heartbeat_at": now})

    def admit(self, ticket: dict[str, Any]) -> dict[str, Any] | None:
        return self.beat(ticket, admitted_at=_iso(self.clock()))

    def release(self, ticket: dict[str, Any]) -> dict[str, Any] | None:
        now = _iso(self.clock())
        return self._update(int(ticket["seq"]), lambda t: {**t, "released_at": now})

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
                path = self._path(int(ticket["seq"]))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                with contextlib.suppress(FileNotFoundError):  # replace_if_version's lock file
                    (self.dir / f".{path.name}.lock").unlink()

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
    """Take over or take the owner's ticket for ``ledger_path``, beat it and check it.

    Returns the ticket (marked admitted when it is) and the admission. The owner's live ticket is
    taken over in place (a retry keeps its place); a stale one is released and replaced at the back.
    """
    ticket = None
    for _ in range(MAX_CREATE_ATTEMPTS):
        found = queue.find(owner, ledger_path)
        if found is None:
            queue.take(
                owner=owner,
                ledger_path=ledger_path,
                n_requests=n_requests,
                pipeline=pipeline,
                pipeline_budget=pipeline_budget,
                after_batch_id=after_batch_id,
            )
            # Another try of the chunk may have taken one at the same time: the lowest one wins.
            found = queue.find(owner, ledger_path)
            if found is None:
                continue
        beaten = queue.beat(found)
        if beaten is not None and not beaten.get("released_at"):
            ticket = beaten
            break
    if ticket is None:
        raise RuntimeError(f"Could not hold a queue ticket for {ledger_path} in {queue.dir}")
    admission = queue.check(ticket, budget)
    if admission.admitted and not ticket.get("admitted_at"):
        ticket = queue.admit(ticket) or ticket
    return ticket, admission


def ticket_owner(identity: dict[str, Any]) -> str:
    """Who holds a queue ticket: one chunk's task (dag, partition, task, map index).

    Neither the run nor the try: a retry, a zombie beside its retry and a rerun of the date all take
    over the same ticket (with the ledger entry, which is the chunk) instead of queueing behind it.
    """
    return "/".join(str(identity[k]) for k in ("dag_id", "partition", "task_id", "map_index"))


def admission_intervals(
    poll_seconds: float | None = None, max_poll_seconds: float | None = None
) -> tuple[float, float]:
    """(first, largest) seconds between admission checks: given, else env
    ``ANTHROPIC_BATCH_ADMISSION_POLL_INTERVAL`` (largest: 4x it), else 5 s and 60 s."""
    raw = os.environ.get(ADMISSION_POLL_ENV)
    if poll_seconds is None and raw:
        try:
            poll_seconds = float(raw)
        except ValueError as err:
            raise QueueBudgetError(f"{ADMISSION_POLL_ENV} must be a number of seconds, got {raw!r}") from err
        if max_poll_seconds is None:
            max_poll_seconds = max(poll_seconds, min(ADMISSION_MAX_POLL_SECONDS, poll_seconds * 4))
    first = ADMISSION_POLL_SECONDS if poll_seconds is None else float(poll_seconds)
    largest = ADMISSION_MAX_POLL_SECONDS if max_poll_seconds is None else float(max_poll_seconds)
    return first, max(first, largest)


def batch_ended_checker(conn_id: str) -> Callable[[str], bool]:
    """``batch_ended(batch_id)`` through the API, for :class:`TicketQueue` (the SDK loads lazily)."""

    def batch_ended(batch_id: str) -> bool:
        # the anthropic SDK and the provider's BatchStatus: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook
        from anthropic_batch.status import BatchStatus

        return AnthropicBatchHook(conn_id=conn_id).get_batch(batch_id).processing_status == BatchStatus.ENDED

    return batch_ended
