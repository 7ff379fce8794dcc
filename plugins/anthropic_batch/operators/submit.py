"""SubmitBatchOperator: submit one prepared chunk, at most once.

Mapped over the chunk paths that prepare returns. Everything else comes from the run's manifest
(``{work_dir}/requests/manifest.json``): model, pipeline, partition, mode and the chunk's fingerprint.
The submission goes through :func:`anthropic_batch.submission.submit_idempotently`, so concurrent,
retried or re-run tasks of one chunk (two runs of a date, a zombie beside its retry) make one batch
and all re-attach to it instead of paying again. The batch id is pushed to XCom
(key ``batch_id``) the moment it is known, for the Console link; the BatchHandle is returned.

Queue budget (:mod:`anthropic_batch.queue_budget`): with ``queue_budget_requests`` set (the DAG
factory does) or a deployment-wide budget configured, a chunk that has no batch yet first takes a
ticket (a retry or rerun takes over the chunk's ticket and keeps its place); while it is not
admitted the task defers on an :class:`~anthropic_batch.admission_trigger.AdmissionTrigger`, which
waits in the triggerer (no worker slot, ticket kept alive) and resumes the task once, admitted.
``wait=True`` then also waits for the batch in the same task (deferred on
``BatchPollTrigger``), so the chunk's ticket counts from admission to the batch's end, when it is
released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from anthropic_batch import queue_budget
from anthropic_batch.contracts import BatchHandle, ChunkInfo
from anthropic_batch.layout import read_manifest
from anthropic_batch.ledger import (
    SubmissionLedger,
    handle_from_entry,
    is_fully_canceled,
    ledger_root_for,
    read_entry,
)
from anthropic_batch.links import BATCH_ID_XCOM_KEY, AnthropicConsoleBatchLink
from anthropic_batch.sensors import BatchWaitMixin, admit_or_defer, raise_for_admission_event
from anthropic_batch.status import DEFAULT_CONN_ID
from anthropic_batch.submission import (
    find_chunk,
    projected_cost_usd,
    submission_identity,
    submit_idempotently,
)
from anthropic_batch.triggers import DEFAULT_MAX_TRANSIENT_SECONDS


class SubmitBatchOperator(BatchWaitMixin, BaseOperator):
    """
    Submit one chunk file as a Message Batch (or run it synchronously in ``mode=sync``).

    :param chunk_path: the chunk file (templated; map over prepare's output).
    :param work_dir: the run's work directory holding ``requests/manifest.json`` (templated).
    :param storage_root: root for the ledger; default: the root ``work_dir`` sits in
        (``{root}/{pipeline}/work/date=...``), else the configured storage root.
    :param conn_id: the Anthropic connection.
    :param attempt: submission attempt number (1 for the first submission).
    :param wait: also wait for the batch to end in this task (deferred), returning the handle then;
        the chunk's queue ticket (and a slot of a pool that counts deferred tasks) is held from create
        to end.
    :param queue_budget_requests: the pipeline's queue budget (requests in progress); with it (or a
        deployment budget) the chunk waits for admission before its batch is created.
    :param admission_poll_seconds: first seconds between admission checks in the triggerer (None:
        env ``ANTHROPIC_BATCH_ADMISSION_POLL_INTERVAL``, else 5 s); independent of ``poll_interval``.
    :param admission_max_poll_seconds: the admission check interval grows toward this while nothing
        ahead changes (None: 4x the env value, else 60 s).
    :param queue_root: storage root of the ticket queue (default: the deployment's storage root).
    :param poll_interval, max_poll_interval, deadline_hours, cancel_wait_hours, max_transient_seconds:
        the wait, as for :class:`~anthropic_batch.sensors.AnthropicBatchSensor`.
    """

    wait_method = "wait_complete"

    template_fields: Sequence[str] = ("chunk_path", "work_dir", "storage_root")
    operator_extra_links = (AnthropicConsoleBatchLink(),)
    ui_color = "#d4a27f"

    def __init__(
        self,
        *,
        chunk_path: str,
        work_dir: str,
        storage_root: str | None = None,
        conn_id: str = DEFAULT_CONN_ID,
        attempt: int = 1,
        wait: bool = False,
        queue_budget_requests: int | None = None,
        admission_poll_seconds: float | None = None,
        admission_max_poll_seconds: float | None = None,
        queue_root: str | None = None,
        poll_interval: float = 30.0,
        max_poll_interval: float = 600.0,
        deadline_hours: float = 30.0,
        cancel_wait_hours: float = 2.0,
        max_transient_seconds: float = DEFAULT_MAX_TRANSIENT_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk_path = chunk_path
        self.work_dir = work_dir
        self.storage_root = storage_root
        self.conn_id = conn_id
        self.attempt = attempt
        self.wait = wait
        self.queue_budget_requests = queue_budget_requests
        self.admission_poll_seconds = admission_poll_seconds
        self.admission_max_poll_seconds = admission_max_poll_seconds
        self.queue_root = queue_root
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.deadline_hours = deadline_hours
        self.cancel_wait_hours = cancel_wait_hours
        self.max_transient_seconds = max_transient_seconds
        self.handle: dict[str, Any] = {}

    def _ledger(self) -> SubmissionLedger:
        return SubmissionLedger(ledger_root_for(self.work_dir, self.storage_root))

    def _ledger_path(self, context: Any) -> tuple[str, ChunkInfo, dict[str, Any]]:
        """(ledger entry path, chunk info, submission identity) of this task's chunk."""
        manifest = read_manifest(self.work_dir)
        chunk = find_chunk(manifest, self.chunk_path)
        identity = submission_identity(context["ti"], manifest)
        path = self._ledger().entry_path(
            identity["dag_id"], identity["partition"], identity["task_id"], chunk.fingerprint
        )
        return str(path), chunk, identity

    def admission_complete(self, context: Any, event: Any = None) -> dict[str, Any]:
        """Resume once after the admission trigger: submit (the ticket is admitted), re-attach (another
        try created the batch), or fail clearly on the trigger's error."""
        raise_for_admission_event(event)
        return self.execute(context)

    def execute(self, context: Any) -> dict[str, Any]:
        ledger_path, chunk, identity = self._ledger_path(context)
        entry = read_entry(ledger_path) or {}
        # Re-attaching to a recorded batch needs no admission: its own ticket already counts it.
        needs_batch = not entry.get("batch_id") or is_fully_canceled(entry)
        self._ticket_owner = queue_budget.ticket_owner(identity)
        if identity["mode"] != "sync" and needs_batch:
            admit_or_defer(
                self,
                ledger_path=ledger_path,
                identity=identity,
                n_requests=chunk.n_requests,
                pipeline_budget=self.queue_budget_requests,
                admission_poll_seconds=self.admission_poll_seconds,
                admission_max_poll_seconds=self.admission_max_poll_seconds,
                method_name="admission_complete",
                queue_root=self.queue_root,
                conn_id=self.conn_id,
            )
        handle = self._submit(context)
        if not self.wait:
            return handle
        self.handle = handle
        if self._is_sync():
            return handle
        self._start_wait()  # returns only when the batch has ended already (else defers)
        return handle

    def wait_complete(
        self, context: Any, event: dict[str, Any] | None = None, canceling: bool = False
    ) -> dict[str, Any]:
        """Resume after the batch's trigger; returns the handle once the batch has ended."""
        ledger_path, _, identity = self._ledger_path(context)
        self._ticket_owner = queue_budget.ticket_owner(identity)
        entry = read_entry(ledger_path)
        if not entry or not entry.get("batch_id"):
            raise AirflowFailException(f"Ledger entry {ledger_path} has no batch; clear the task to submit.")
        self.handle = handle_from_entry(entry, ledger_path).to_xcom()
        self._on_wait_event(event, canceling)
        return self.handle

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Record the end (as the sensor does) and release this task's queue ticket."""
        batch = super()._finish(batch)
        ledger_path = self.batch_handle.ledger_path
        owner = getattr(self, "_ticket_owner", None)
        if ledger_path and owner:
            queue_budget.TicketQueue(self.queue_root).release_owned(owner, str(ledger_path))
        return batch

    def _submit(self, context: Any) -> dict[str, Any]:
        from anthropic_batch.hooks import AnthropicBatchHook  # the SDK: not at DAG parse time

        manifest = read_manifest(self.work_dir)
        chunk = find_chunk(manifest, self.chunk_path)
        model = str(manifest.spec.model)
        cost = projected_cost_usd(model, chunk.n_requests, chunk.n_bytes, manifest.spec.max_tokens)
        self.log.info(
            "Chunk %s: %d requests, %.1f MiB, model %s, mode %s, projected cost <= %s USD.",
            chunk.path,
            chunk.n_requests,
            chunk.n_bytes / 2**20,
            model,
            manifest.mode,
            f"{cost:.2f}" if cost is not None else "unknown",
        )
        ti = context["ti"]
        handle = BatchHandle.of(
            submit_idempotently(
                AnthropicBatchHook(conn_id=self.conn_id),
                self._ledger(),
                chunk_path=chunk.path,
                chunk_fingerprint=chunk.fingerprint,
                n_requests=chunk.n_requests,
                n_bytes=chunk.n_bytes,
                **submission_identity(ti, manifest),
                attempt=self.attempt,
                model=model,
                projected_cost_usd=cost,
            )
        )
        # Pushed at once (not only as the return value) so the Console link works even if the
        # task fails after this point. A sync run has no batch, hence no Console page.
        if handle.batch_id:
            ti.xcom_push(key=BATCH_ID_XCOM_KEY, value=handle.batch_id)
        self.log.info("Handle: %s", handle)
        return handle.to_xcom()
