"""AnthropicBatchSensor: wait for a submitted batch to end, deferrable by default.

Input is the BatchHandle from the submit operator (or a bare batch id). Deferrable mode polls once
on the worker (a retried task may find the batch already ended), then hands the wait to
:class:`~anthropic_batch.triggers.BatchPollTrigger` in the triggerer. Poke/reschedule mode polls
with the sync client. A ``mode="sync"`` handle names no batch (its run is complete when submit
returns): the sensor returns that handle at once, without touching the API.

The wait is bounded by ``deadline_hours`` counted from the batch's ``created_at`` (30 h by default:
beyond the API's 24 h expiry, so a healthy batch always ends first). On the deadline the batch is
canceled (best effort, recorded in the ledger entry as a ``deadline`` cancel) and the sensor keeps
waiting, deferred, up to ``cancel_wait_hours`` more, for the batch to reach ``ended``; then it
succeeds, so collect keeps what was processed and resubmit sends the canceled requests again (a
deadline cancel is ours: those requests are still wanted). A sensor (re)tried after its deadline
does the same: it cancels if the batch is still ``in_progress`` and waits while it is
``canceling``. Only a batch that does not finish canceling in time fails the task.

Clearing, retrying or marking the task never cancels the batch: a new try re-attaches to it (the
trigger's ``on_kill`` deliberately leaves it running, see :mod:`anthropic_batch.triggers`). An
explicit Cancel on the Batches page is the way to stop paying (:mod:`anthropic_batch.cancel`); the
sensor then sees the batch end and succeeds, and the canceled requests are dead-lettered.

On ``ended`` the ledger entry is updated (status, counts, ended_at, expires_at) and the batch JSON
is returned (XCom); for a sync handle, the handle's JSON.

The admission wait before a batch is created (queue budget, :func:`admit_or_defer`) lives here too:
take or take over the chunk's ticket, and while it is not admitted defer on
:class:`~anthropic_batch.admission_trigger.AdmissionTrigger` (resumes the task once).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from anthropic_batch import queue_budget
from anthropic_batch.admission_trigger import AdmissionEvent, AdmissionTrigger
from anthropic_batch.cancel import CancelReason, record_cancel
from anthropic_batch.contracts import BatchHandle
from anthropic_batch.ledger import ended_fields, read_entry, update_entry
from anthropic_batch.links import AnthropicConsoleBatchLink
from anthropic_batch.status import DEFAULT_CONN_ID, ProcessingStatus, RequestCountKey
from anthropic_batch.triggers import DEFAULT_MAX_TRANSIENT_SECONDS, BatchPollTrigger, describe

if TYPE_CHECKING:
    from anthropic_batch.hooks import AnthropicBatchHook

# The hook (and with it the anthropic SDK) is imported where it is used: DAG files import this module.


def fatal_error_types() -> frozenset[str]:
    """Trigger error types after which retrying the task cannot help."""
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import FATAL_ERRORS

    return frozenset(cls.__name__ for cls in FATAL_ERRORS)


def __getattr__(name: str) -> Any:
    # FATAL_ERROR_TYPES stays importable without loading the SDK at module import.
    if name == "FATAL_ERROR_TYPES":
        return fatal_error_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_id_of(handle: dict[str, Any] | str) -> str:
    """The batch id of a BatchHandle dict or a bare id string."""
    batch_id = BatchHandle.of(handle).batch_id
    if not batch_id:
        raise ValueError(f"The handle {handle!r} names no batch (a synchronous run).")
    return batch_id


def deadline_epoch(created_at: datetime | None, deadline_hours: float, now: float) -> float:
    """Wall-clock deadline: ``created_at + deadline_hours`` (else now + deadline_hours)."""
    if created_at is None:
        return now + deadline_hours * 3600
    return (created_at + timedelta(hours=deadline_hours)).timestamp()


class BatchWaitMixin:
    """Waiting for a batch to end, deferrable, with the deadline cancel (see the module docstring).

    Shared by :class:`AnthropicBatchSensor` and ``SubmitBatchOperator(wait=True)`` (which creates and waits in
    one task so the chunk keeps its queue ticket from create to end). The host sets ``handle``,
    ``conn_id``, ``poll_interval``, ``max_poll_interval``, ``deadline_hours``, ``cancel_wait_hours``
    and ``max_transient_seconds``; ``wait_method`` names the method the trigger resumes.
    """

    wait_method = "execute_complete"
    handle: dict[str, Any] | str
    conn_id: str
    poll_interval: float
    max_poll_interval: float
    deadline_hours: float
    cancel_wait_hours: float
    max_transient_seconds: float

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def batch_handle(self) -> BatchHandle:
        """The rendered ``handle`` validated (a bare batch id becomes a batch handle)."""
        return BatchHandle.of(self.handle)

    @property
    def batch_id(self) -> str:
        return batch_id_of(self.handle)

    def _hook(self) -> AnthropicBatchHook:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook

        return AnthropicBatchHook(conn_id=self.conn_id)

    def _is_sync(self) -> bool:
        return self.batch_handle.is_sync

    @property
    def ledger_path(self) -> str | None:
        return self.batch_handle.ledger_path

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record the ended batch in the ledger and return it."""
        ledger_path = self.ledger_path
        if ledger_path:
            try:
                update_entry(ledger_path, **ended_fields(batch))
            except FileNotFoundError:
                self.log.warning(
                    "Ledger entry %s is gone; not recording the end of %s.", ledger_path, batch["id"]
                )
        counts = batch.get("request_counts") or {}
        self.log.info(
            "Batch %s ended: succeeded=%s errored=%s canceled=%s expired=%s.",
            batch["id"],
            counts.get(RequestCountKey.SUCCEEDED),
            counts.get(RequestCountKey.ERRORED),
            counts.get(RequestCountKey.CANCELED),
            counts.get(RequestCountKey.EXPIRED),
        )
        return batch

    def _cancel_for_deadline(self) -> None:
        """Cancel the batch (best effort) and record it in the ledger as a deadline cancel."""
        try:
            batch = self._hook().cancel_batch(self.batch_id)
        except Exception as err:
            self.log.warning("Deadline passed; cancelling batch %s failed: %s", self.batch_id, err)
            return
        self.log.warning(
            "Deadline passed (%s h after creation): cancel requested for batch %s (%s). Waiting for "
            "the cancellation to finish; the canceled requests will be resubmitted.",
            self.deadline_hours,
            self.batch_id,
            batch.processing_status,
        )
        if self.ledger_path:
            try:
                record_cancel(self.ledger_path, CancelReason.DEADLINE, batch=batch)
            except FileNotFoundError:
                self.log.warning("Ledger entry %s is gone; cancel not recorded.", self.ledger_path)

    def _defer(self, deadline: float, *, canceling: bool) -> None:
        """Hand the wait to the trigger until ``deadline`` (epoch seconds)."""
        self.log.info(
            "Deferring until batch %s ends (%s %s).",
            self.batch_id,
            "cancellation deadline" if canceling else "deadline",
            datetime.fromtimestamp(deadline, UTC).isoformat(),
        )
        self.defer(
            trigger=BatchPollTrigger(
                batch_id=self.batch_id,
                conn_id=self.conn_id,
                deadline=deadline,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                max_transient_seconds=self.max_transient_seconds,
            ),
            method_name=self.wait_method,
            kwargs=dict(canceling=canceling),
            # A margin past the trigger's own deadline: the trigger reports it, not a bare timeout.
            timeout=timedelta(seconds=max(60.0, deadline - time.time()) + 600),
        )

    def _cancel_wait_deadline(self, deadline: float, now: float) -> float:
        """Until when a batch canceled at ``deadline`` may take to finish canceling."""
        return max(deadline, now) + self.cancel_wait_hours * 3600

    def _start_wait(self) -> Any:
        """Poll once; return the ended batch, or defer until it ends (cancelling past the deadline)."""
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import FATAL_ERRORS
        from anthropic_batch.status import BatchStatus

        batch = None
        try:
            batch = self._hook().get_batch(self.batch_id)
        except FATAL_ERRORS as err:
            raise AirflowFailException(f"Cannot read batch {self.batch_id}: {err}") from err
        except Exception as err:  # transient: let the trigger's tolerance handle it
            self.log.warning("First poll of %s failed (%s); deferring anyway.", self.batch_id, err)
        if batch is not None:
            self.log.info("%s", describe(batch, datetime.now(UTC)))
            if batch.processing_status == ProcessingStatus.ENDED:
                return self._finish(batch.model_dump(mode="json"))
        now = time.time()
        deadline = deadline_epoch(batch.created_at if batch else None, self.deadline_hours, now)
        if batch is not None and now >= deadline:
            # A try that starts past the deadline (a retry, a cleared task): make sure the batch is
            # being canceled, then wait for the cancellation instead of failing while it is canceling.
            if batch.processing_status == BatchStatus.IN_PROGRESS:
                self._cancel_for_deadline()
            self._defer(self._cancel_wait_deadline(deadline, now), canceling=True)
        self._defer(deadline, canceling=False)

    def _on_wait_event(self, event: dict[str, Any] | None, canceling: bool) -> dict[str, Any]:
        """Resume after the trigger: ended -> record and return; deadline -> cancel and wait for the
        cancellation (once); a deadline while canceling or an error -> fail clearly."""
        if not event or "status" not in event:
            raise AirflowException(f"BatchPollTrigger returned no usable event: {event!r}")
        status = event["status"]
        if status == ProcessingStatus.ENDED:
            return self._finish(event["batch"])
        if status == "deadline":
            # ``canceling`` comes from the deferral kwargs; the last seen batch says it too (dag.test
            # resumes without the kwargs).
            if canceling or (event.get("batch") or {}).get("cancel_initiated_at"):
                raise AirflowException(
                    f"Batch {self.batch_id} did not finish canceling within {self.cancel_wait_hours} h "
                    "of its deadline. Clear the task to wait again."
                )
            self._cancel_for_deadline()
            now = time.time()
            self._defer(self._cancel_wait_deadline(now, now), canceling=True)
        message = f"Waiting for batch {event.get('batch_id')} failed: {event.get('message')}"
        if event.get("error_type") in fatal_error_types():
            raise AirflowFailException(message + " (fix the connection's key, permissions or billing)")
        raise AirflowException(message)


class AnthropicBatchSensor(BatchWaitMixin, BaseSensorOperator):
    """
    Wait until a Message Batch has ended; returns the batch JSON.

    :param handle: the BatchHandle from SubmitBatchOperator (templated), or a batch id.
    :param conn_id: the Anthropic connection.
    :param deferrable: wait in the triggerer (default) instead of occupying a worker slot.
    :param poll_interval: first seconds between polls (grows while nothing changes).
    :param max_poll_interval: upper bound of the poll interval.
    :param deadline_hours: cancel the batch this long after it was created.
    :param cancel_wait_hours: after that cancel, how long to wait for the batch to end.
    :param max_transient_seconds: how long polls may keep failing transiently (429, 5xx, 529,
        connection errors, early 404) before the try fails.
    """

    template_fields: Sequence[str] = ("handle",)
    operator_extra_links = (AnthropicConsoleBatchLink(),)
    ui_color = "#d4a27f"

    def __init__(
        self,
        *,
        handle: dict[str, Any] | str,
        conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool = True,
        poll_interval: float = 30,
        max_poll_interval: float = 600,
        deadline_hours: float = 30,
        cancel_wait_hours: float = 2,
        max_transient_seconds: float = DEFAULT_MAX_TRANSIENT_SECONDS,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        kwargs.setdefault("timeout", (deadline_hours + cancel_wait_hours) * 3600)
        kwargs.setdefault("exponential_backoff", True)
        kwargs.setdefault("max_wait", max_poll_interval)
        super().__init__(**kwargs)
        self.handle = handle
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.deadline_hours = deadline_hours
        self.cancel_wait_hours = cancel_wait_hours
        self.max_transient_seconds = max_transient_seconds

    # -- execution -------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        handle = self.batch_handle
        if handle.is_sync:
            # No batch to wait for: the synchronous run ended before submit returned.
            self.log.info("Sync run %s: results are already at %s.", handle.sync_run_id, handle.results_path)
            return handle.to_xcom()
        if not self.deferrable:
            return super().execute(context)
        return self._start_wait()

    def poke(self, context: Any) -> bool | PokeReturnValue:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import FATAL_ERRORS
        from anthropic_batch.status import BatchStatus

        try:
            batch = self._hook().get_batch(self.batch_id)
        except FATAL_ERRORS as err:
            raise AirflowFailException(f"Cannot read batch {self.batch_id}: {err}") from err
        self.log.info("%s", describe(batch, datetime.now(UTC)))
        if batch.processing_status == ProcessingStatus.ENDED:
            return PokeReturnValue(is_done=True, xcom_value=self._finish(batch.model_dump(mode="json")))
        now = time.time()
        deadline = deadline_epoch(batch.created_at, self.deadline_hours, now)
        if now > deadline:
            if now > self._cancel_wait_deadline(deadline, deadline):
                raise AirflowException(
                    f"Batch {self.batch_id} did not end within {self.cancel_wait_hours} h of the "
                    f"deadline ({self.deadline_hours} h after creation) although a cancel was requested."
                )
            if batch.processing_status == BatchStatus.IN_PROGRESS:
                self._cancel_for_deadline()
        return False

    def execute_complete(
        self, context: Any, event: dict[str, Any] | None = None, canceling: bool = False
    ) -> dict[str, Any]:
        """Resume after the trigger: ended -> record and return; deadline -> cancel and wait for the
        cancellation (once); a deadline while canceling or an error -> fail clearly."""
        return self._on_wait_event(event, canceling)


# -- the admission wait (queue budget): before a batch is created ------------------------------------
def admit_or_defer(
    operator: Any,
    *,
    ledger_path: str,
    identity: dict[str, Any],
    n_requests: int,
    pipeline_budget: int | None,
    method_name: str,
    admission_poll_seconds: float | None = None,
    admission_max_poll_seconds: float | None = None,
    queue_root: str | None = None,
    conn_id: str = DEFAULT_CONN_ID,
) -> None:
    """Take (or take over) this chunk's queue ticket; when it is not admitted, defer on an
    :class:`~anthropic_batch.admission_trigger.AdmissionTrigger`, which waits in the triggerer and
    resumes ``method_name`` once, admitted. Returns when admitted, or at once when no budget is set."""
    budget = queue_budget.deployment_budget()
    if pipeline_budget is None and budget is None:
        return
    pipeline_budget = pipeline_budget if pipeline_budget is not None else budget
    assert pipeline_budget is not None
    entry = read_entry(ledger_path) or {}
    # The ticket's terms, the same on the worker and in the trigger.
    ticket = {
        "owner": queue_budget.ticket_owner(identity),
        "ledger_path": ledger_path,
        "n_requests": n_requests,
        "pipeline": identity["pipeline"],
        "pipeline_budget": pipeline_budget,
        "budget": budget,
        "after_batch_id": entry.get("batch_id"),
    }
    queue = queue_budget.TicketQueue(queue_root, batch_ended=queue_budget.batch_ended_checker(conn_id))
    try:
        _, admission = queue_budget.acquire(queue, **ticket)
    except queue_budget.QueueBudgetError as err:
        raise AirflowFailException(str(err)) from err
    operator.log.info("Queue budget: %s.", admission.describe(n_requests))
    if admission.admitted:
        return
    first, largest = queue_budget.admission_intervals(admission_poll_seconds, admission_max_poll_seconds)
    operator.log.info(
        "Waiting for admission in the triggerer (checks every %gs growing to %gs; the ticket keeps "
        "its place while the trigger beats it).",
        first,
        largest,
    )
    operator.defer(
        trigger=AdmissionTrigger(
            **ticket,
            queue_root=str(queue_root) if queue_root is not None else None,
            conn_id=conn_id,
            poll_interval=first,
            max_poll_interval=largest,
            lease_seconds=queue.lease_seconds,
        ),
        method_name=method_name,
    )


def raise_for_admission_event(event: Any) -> None:
    """After an admission wait: fail clearly on the trigger's error or timeout; else return."""
    if not isinstance(event, dict) or event.get("status") not in (
        AdmissionEvent.ERROR,
        AdmissionEvent.TIMEOUT,
    ):
        return
    message = f"Waiting for queue admission failed: {event.get('message')}"
    if event.get("error_type") == queue_budget.QueueBudgetError.__name__:
        raise AirflowFailException(message)
    raise AirflowException(message + " (a retry takes over the same ticket)")
