"""BatchPollTrigger: wait for a Message Batch in the triggerer, cheaply and patiently.

Runs in the triggerer's event loop, so every call uses the async client (never a blocking one).
Polls start at ``poll_interval`` and grow by half (with jitter) toward ``max_poll_interval`` while
nothing changes; when the request counts or status move, the interval drops back to
``poll_interval`` (a moving batch is often close to done). Transient trouble (429, 5xx, 529,
connection errors, the 404 just after create) is tolerated for ``max_transient_seconds`` of
uninterrupted failure (wall time, so the patience does not shrink with a short poll interval);
401/402/403 are fatal at once. Exactly one event is yielded:

- ``{"status": "ended", "batch_id", "batch": <MessageBatch JSON>}``
- ``{"status": "deadline", "batch_id", "message", "batch": <last seen JSON or None>}``
- ``{"status": "error", "batch_id", "message", "error_type"}``

``on_kill`` does NOT cancel the batch. Airflow 3.3 calls it for clear, mark-failed and mark-success
alike (the triggerer only learns that its trigger row went away, ``triggerer_job_runner``
``cancel_triggers``: one message, ``__airflow_user_action__``, for every user action), so the
trigger cannot tell "stop paying" from "wait again": a cleared or retried task must re-attach to
the batch already paid for. Canceling is an explicit action on the Batches page
(:mod:`anthropic_batch.cancel`).
The trigger lives in the plugins folder so the triggerer can import it by its classpath
``anthropic_batch.triggers.BatchPollTrigger``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from anthropic_batch.status import DEFAULT_CONN_ID, ProcessingStatus, transient_api_errors

if TYPE_CHECKING:
    import anthropic

# The hook (and with it the anthropic SDK) is imported where it is used: sensors import this module
# when a DAG file is parsed.

CLASSPATH = "anthropic_batch.triggers.BatchPollTrigger"
#: Growth factor of the poll interval while nothing changes.
BACKOFF_FACTOR = 1.5
#: Default patience for uninterrupted transient failures: well above a typical API incident.
DEFAULT_MAX_TRANSIENT_SECONDS = 30 * 60.0


def next_interval(current: float, *, changed: bool, poll_interval: float, max_poll_interval: float) -> float:
    """The next (un-jittered) poll interval: reset on change, else grow toward the maximum."""
    if changed:
        return poll_interval
    return min(max_poll_interval, max(poll_interval, current * BACKOFF_FACTOR))


def jittered(interval: float, remaining: float) -> float:
    """``interval`` +-10 % (so many triggers do not poll in lockstep), never past the deadline."""
    return max(0.0, min(interval * random.uniform(0.9, 1.1), remaining))


def is_transient(error: BaseException) -> bool:
    """Errors worth another poll: rate limits, overload, server errors, network, early 404."""
    # the anthropic SDK: kept out of DAG parsing
    import anthropic

    return isinstance(
        error,
        (
            *transient_api_errors(),
            anthropic.NotFoundError,
            anthropic.ConflictError,
            anthropic.RequestTimeoutError,
        ),
    )


def batch_snapshot(batch: Any) -> tuple[Any, ...]:
    """What counts as "progress" between two polls."""
    counts = batch.request_counts
    return (
        batch.processing_status,
        counts.processing,
        counts.succeeded,
        counts.errored,
        counts.canceled,
        counts.expired,
    )


def describe(batch: Any, now: datetime) -> str:
    """One log line: status, age, time to expiry, counts."""
    age = (now - batch.created_at).total_seconds() if batch.created_at else 0.0
    to_expiry = (batch.expires_at - now).total_seconds() if batch.expires_at else 0.0
    c = batch.request_counts
    return (
        f"batch {batch.id}: {batch.processing_status}, age {_hm(age)}, expires in {_hm(to_expiry)}, "
        f"processing={c.processing} succeeded={c.succeeded} errored={c.errored} "
        f"canceled={c.canceled} expired={c.expired}"
    )


def _hm(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(seconds))
    return f"{sign}{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


class BatchPollTrigger(BaseTrigger):
    """
    Poll one Message Batch until it ends, the deadline passes, or a fatal error occurs.

    :param batch_id: the batch to wait for.
    :param conn_id: the Anthropic connection (the key never enters the trigger's kwargs).
    :param deadline: wall-clock epoch seconds; wall clock because the trigger may resume in
        another triggerer process after a restart.
    :param poll_interval: first (and minimum) seconds between polls.
    :param max_poll_interval: the interval grows toward this while nothing changes.
    :param max_transient_seconds: how long polls may keep failing transiently (429, 5xx, 529,
        connection errors, early 404) before the trigger gives up with an ``error`` event.
    :param max_transient_errors: ignored; accepted so that triggers serialized by an earlier
        version (which counted failures) still load after an upgrade.
    """

    def __init__(
        self,
        batch_id: str,
        conn_id: str = DEFAULT_CONN_ID,
        deadline: float | None = None,
        poll_interval: float = 30.0,
        max_poll_interval: float = 600.0,
        max_transient_seconds: float = DEFAULT_MAX_TRANSIENT_SECONDS,
        max_transient_errors: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.deadline = float(deadline) if deadline is not None else time.time() + 30 * 3600
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = max(float(max_poll_interval), self.poll_interval)
        self.max_transient_seconds = float(max_transient_seconds)
        del max_transient_errors  # see the docstring: counting polls made patience depend on the interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            CLASSPATH,
            {
                "batch_id": self.batch_id,
                "conn_id": self.conn_id,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "max_transient_seconds": self.max_transient_seconds,
            },
        )

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        return TriggerEvent({"status": status, "batch_id": self.batch_id, **fields})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook

        hook = AnthropicBatchHook(conn_id=self.conn_id)
        try:
            # On the loop's shared HTTP pool: hundreds of triggers, one pool, no per-trigger TLS setup.
            # The shared pool is not closed here; it lives as long as the event loop.
            client = await hook.get_async_conn(shared_http=True)
        except Exception as err:
            yield self._event(
                "error", message=f"Cannot build the Anthropic client: {err}", error_type="config"
            )
            return
        yield await self._poll(client)

    async def _poll(self, client: anthropic.AsyncAnthropic) -> TriggerEvent:
        # the anthropic SDK: kept out of DAG parsing
        from anthropic_batch.hooks import FATAL_ERRORS

        interval = self.poll_interval
        last_snapshot: tuple[Any, ...] | None = None
        last_batch: Any = None
        failures = 0
        failing_since: float | None = None  # monotonic time of the first failure of the current streak
        while True:
            try:
                batch = await client.messages.batches.retrieve(self.batch_id)
            except FATAL_ERRORS as err:
                self.log.error("Fatal error polling %s: %s", self.batch_id, err)
                return self._event(
                    "error", message=f"{type(err).__name__}: {err}", error_type=type(err).__name__
                )
            except Exception as err:
                if not is_transient(err):
                    return self._event(
                        "error", message=f"{type(err).__name__}: {err}", error_type=type(err).__name__
                    )
                failures += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                failing_for = time.monotonic() - failing_since
                if failing_for > self.max_transient_seconds:
                    return self._event(
                        "error",
                        message=(
                            f"Polling {self.batch_id} kept failing for {failing_for:.0f}s "
                            f"({failures} attempts; max_transient_seconds={self.max_transient_seconds:g}); "
                            f"last: {type(err).__name__}: {err}"
                        ),
                        error_type=type(err).__name__,
                    )
                self.log.warning(
                    "Polling %s failed (%s; failing for %.0fs of %.0fs tolerated); will retry.",
                    self.batch_id,
                    type(err).__name__,
                    failing_for,
                    self.max_transient_seconds,
                )
            else:
                failures = 0
                failing_since = None
                last_batch = batch
                now = datetime.now(UTC)
                self.log.info("%s", describe(batch, now))
                if batch.processing_status == ProcessingStatus.ENDED:
                    return self._event(ProcessingStatus.ENDED.value, batch=batch.model_dump(mode="json"))
                snapshot = batch_snapshot(batch)
                changed = last_snapshot is not None and snapshot != last_snapshot
                if last_snapshot is not None:
                    interval = next_interval(
                        interval,
                        changed=changed,
                        poll_interval=self.poll_interval,
                        max_poll_interval=self.max_poll_interval,
                    )
                last_snapshot = snapshot

            remaining = self.deadline - time.time()
            if remaining <= 0:
                return self._event(
                    "deadline",
                    message=(
                        f"Batch {self.batch_id} had not ended by the deadline "
                        f"{datetime.fromtimestamp(self.deadline, UTC).isoformat()}."
                    ),
                    batch=last_batch.model_dump(mode="json") if last_batch is not None else None,
                )
            await asyncio.sleep(jittered(interval, remaining))

    async def on_kill(self) -> None:
        """Leave the batch running: see the module docstring (a clear must re-attach, not cancel)."""
        self.log.info(
            "Task stopped by a user action (clear, mark failed or mark success); batch %s keeps "
            "running and a new try re-attaches to it. To stop paying for it, use Cancel on the "
            "Batches page.",
            self.batch_id,
        )
