"""BatchSensor: wait for a submitted batch to end, deferrable by default.

Input is the BatchHandle from the submit operator (or a bare batch id). Deferrable mode polls once
on the worker (a retried task may find the batch already ended), then hands the wait to
:class:`~anthropic_batch.triggers.BatchPollTrigger` in the triggerer. Poke/reschedule mode polls
with the sync client. ``mode="sync"`` handles are complete already and return at once.

The wait is bounded by ``deadline_hours`` counted from the batch's ``created_at`` (30 h by default:
beyond the API's 24 h expiry, so a healthy batch always ends first). On the deadline the batch is
canceled (best effort) and the task fails: the user asked to stop waiting, and requests still
processing after that would be paid for but never collected. A retry of the sensor then waits for
the cancellation to finish, and collect/resubmit treat the canceled requests as retriable.

Killing the task cancels the batch only in deferrable mode (the trigger's ``on_kill``, which
Airflow 3.3 calls for user actions only). In poke mode the operator's ``on_kill`` also fires when a
worker shuts down, so it deliberately does not cancel: a deploy must not cancel running batches.

On ``ended`` the ledger entry is updated (status, counts, ended_at, expires_at) and the batch JSON
is returned (XCom).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from anthropic_batch.ledger import ended_fields, update_entry
from anthropic_batch.links import AnthropicConsoleBatchLink
from anthropic_batch.status import DEFAULT_CONN_ID
from anthropic_batch.triggers import BatchPollTrigger, describe

if TYPE_CHECKING:
    from anthropic_batch.hooks import BatchHook

# The hook (and with it the anthropic SDK) is imported where it is used: DAG files import this module.


def fatal_error_types() -> frozenset[str]:
    """Trigger error types after which retrying the task cannot help."""
    from anthropic_batch.hooks import FATAL_ERRORS

    return frozenset(cls.__name__ for cls in FATAL_ERRORS)


def __getattr__(name: str) -> Any:
    # FATAL_ERROR_TYPES stays importable without loading the SDK at module import.
    if name == "FATAL_ERROR_TYPES":
        return fatal_error_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def batch_id_of(handle: dict[str, Any] | str) -> str:
    """The batch id of a BatchHandle dict or a bare id string."""
    if isinstance(handle, str):
        return handle
    if isinstance(handle, dict) and handle.get("batch_id"):
        return str(handle["batch_id"])
    raise ValueError(f"Expected a BatchHandle dict or a batch id string, got {handle!r}")


def deadline_epoch(created_at: datetime | None, deadline_hours: float, now: float) -> float:
    """Wall-clock deadline: ``created_at + deadline_hours`` (else now + deadline_hours)."""
    if created_at is None:
        return now + deadline_hours * 3600
    return (created_at + timedelta(hours=deadline_hours)).timestamp()


class BatchSensor(BaseSensorOperator):
    """
    Wait until a Message Batch has ended; returns the batch JSON.

    :param handle: the BatchHandle from SubmitBatchOperator (templated), or a batch id.
    :param conn_id: the Anthropic connection.
    :param deferrable: wait in the triggerer (default) instead of occupying a worker slot.
    :param poll_interval: first seconds between polls (grows while nothing changes).
    :param max_poll_interval: upper bound of the poll interval.
    :param deadline_hours: stop waiting this long after the batch was created.
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
        max_transient_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        kwargs.setdefault("timeout", deadline_hours * 3600)
        kwargs.setdefault("exponential_backoff", True)
        kwargs.setdefault("max_wait", max_poll_interval)
        super().__init__(**kwargs)
        self.handle = handle
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.deadline_hours = deadline_hours
        self.max_transient_errors = max_transient_errors

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def batch_id(self) -> str:
        return batch_id_of(self.handle)

    def _hook(self) -> BatchHook:
        from anthropic_batch.hooks import BatchHook

        return BatchHook(conn_id=self.conn_id)

    def _is_sync(self) -> bool:
        return isinstance(self.handle, dict) and self.handle.get("mode") == "sync"

    def _sync_result(self) -> dict[str, Any]:
        """The synthetic batch dict of a mode=sync handle (its ledger entry if readable)."""
        from anthropic_batch.storage import read_json

        entry = {}
        if isinstance(self.handle, dict) and self.handle.get("ledger_path"):
            entry = read_json(self.handle["ledger_path"], default={}) or {}
        return {
            "id": self.batch_id,
            "type": "message_batch",
            "processing_status": "ended",
            "request_counts": entry.get("request_counts"),
            "created_at": entry.get("created_at"),
            "ended_at": entry.get("ended_at"),
            "expires_at": entry.get("expires_at"),
            "results_url": None,
            "results_path": self.handle.get("results_path") if isinstance(self.handle, dict) else None,
        }

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record the ended batch in the ledger and return it."""
        ledger_path = self.handle.get("ledger_path") if isinstance(self.handle, dict) else None
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
            counts.get("succeeded"),
            counts.get("errored"),
            counts.get("canceled"),
            counts.get("expired"),
        )
        return batch

    def _cancel_quietly(self) -> None:
        try:
            self._hook().cancel_batch(self.batch_id)
            self.log.warning("Deadline passed: cancel requested for batch %s.", self.batch_id)
        except Exception as err:
            self.log.warning("Deadline passed; cancelling batch %s failed: %s", self.batch_id, err)

    # -- execution -------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        if self._is_sync():
            self.log.info(
                "Handle %s ran in sync mode: results are already at %s.", self.batch_id, self.handle
            )
            return self._sync_result()
        if not self.deferrable:
            return super().execute(context)
        from anthropic_batch.hooks import FATAL_ERRORS

        batch = None
        try:
            batch = self._hook().get_batch(self.batch_id)
        except FATAL_ERRORS as err:
            raise AirflowFailException(f"Cannot read batch {self.batch_id}: {err}") from err
        except Exception as err:  # transient: let the trigger's tolerance handle it
            self.log.warning("First poll of %s failed (%s); deferring anyway.", self.batch_id, err)
        if batch is not None:
            self.log.info("%s", describe(batch, datetime.now(UTC)))
            if batch.processing_status == "ended":
                return self._finish(batch.model_dump(mode="json"))
        deadline = deadline_epoch(batch.created_at if batch else None, self.deadline_hours, time.time())
        self.log.info(
            "Deferring until batch %s ends (deadline %s).",
            self.batch_id,
            datetime.fromtimestamp(deadline, UTC).isoformat(),
        )
        self.defer(
            trigger=BatchPollTrigger(
                batch_id=self.batch_id,
                conn_id=self.conn_id,
                deadline=deadline,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                max_transient_errors=self.max_transient_errors,
            ),
            method_name="execute_complete",
            # A margin past the trigger's own deadline: the trigger reports it, not a bare timeout.
            timeout=timedelta(seconds=max(60.0, deadline - time.time()) + 600),
        )

    def poke(self, context: Any) -> bool | PokeReturnValue:
        from anthropic_batch.hooks import FATAL_ERRORS

        try:
            batch = self._hook().get_batch(self.batch_id)
        except FATAL_ERRORS as err:
            raise AirflowFailException(f"Cannot read batch {self.batch_id}: {err}") from err
        self.log.info("%s", describe(batch, datetime.now(UTC)))
        if batch.processing_status == "ended":
            return PokeReturnValue(is_done=True, xcom_value=self._finish(batch.model_dump(mode="json")))
        if time.time() > deadline_epoch(batch.created_at, self.deadline_hours, time.time()):
            self._cancel_quietly()
            raise AirflowException(
                f"Batch {self.batch_id} had not ended {self.deadline_hours} h after creation; "
                "cancel requested."
            )
        return False

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: ended -> record and return; deadline/error -> fail clearly."""
        if not event or "status" not in event:
            raise AirflowException(f"BatchPollTrigger returned no usable event: {event!r}")
        status = event["status"]
        if status == "ended":
            return self._finish(event["batch"])
        if status == "deadline":
            self._cancel_quietly()
            raise AirflowException(f"{event.get('message')} Cancel requested; clear the task to wait again.")
        message = f"Waiting for batch {event.get('batch_id')} failed: {event.get('message')}"
        if event.get("error_type") in fatal_error_types():
            raise AirflowFailException(message + " (fix the connection's key, permissions or billing)")
        raise AirflowException(message)
