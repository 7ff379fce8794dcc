"""Who canceled a batch, and why: the one place that writes (and reads) it in the ledger entry.

Two kinds of cancel exist, and they mean opposite things for the canceled requests:

- ``deadline``: the sensor gave up waiting (``deadline_hours``). That was our decision, the
  requests are still wanted: collect keeps what was processed and resubmit sends the rest again.
- ``user``: someone with edit rights on the DAG pressed **Cancel** on the Batches page (or called
  its JSON route). The canceled requests must not be paid for again: they are dead-lettered with
  the reason ``canceled by <user>``.

Clearing, retrying or marking a task never cancels (see :mod:`anthropic_batch.triggers`).
The fields live in the submission's ledger entry: ``cancel_reason``, ``canceled_by``,
``cancel_requested_at``.
"""

from __future__ import annotations

from typing import Any

from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.ledger import (
    LedgerState,
    SubmissionLedger,
    batch_fields,
    read_entry,
    rfc3339,
    update_entry,
    utc_now,
)
from anthropic_batch.status import DEFAULT_CONN_ID, USER_CANCELED_ERROR_TYPE, CancelReason  # noqa: F401
from anthropic_batch.storage import PathLike


class NotCancelable(AnthropicBatchError):
    """The batch cannot be canceled (already ended, never submitted, or run synchronously)."""


def record_cancel(
    ledger_path: PathLike,
    reason: CancelReason,
    *,
    by: str | None = None,
    batch: Any = None,
) -> dict[str, Any]:
    """Write who canceled the batch of ``ledger_path``, when and why (plus its new status).

    A user's cancel is never overwritten: a later deadline cancel of the same batch only refreshes
    its status, so the canceled requests stay dead-lettered as the user decided.
    """
    fields: dict[str, Any] = batch_fields(batch) if batch is not None else {}
    if user_cancel_reason(read_entry(ledger_path)) is None:
        fields.update(cancel_reason=reason.value, canceled_by=by, cancel_requested_at=rfc3339(utc_now()))
    return update_entry(ledger_path, **fields)


def user_cancel_reason(entry: dict[str, Any] | None) -> str | None:
    """``"canceled by <user>"`` when a user canceled this entry's batch, else None.

    This is what resubmit puts in the dead-letter table for the canceled requests of such a batch
    instead of resubmitting them.
    """
    if not entry or entry.get("cancel_reason") != CancelReason.USER:
        return None
    return f"canceled by {entry.get('canceled_by') or 'an unknown user'}"


def takeover_cancel_reason(entry: dict[str, Any] | None, batch_id: str) -> str | None:
    """Why the canceled requests of ``batch_id`` must not be sent again when an urgent ``mode=sync``
    rerun took the batch over (``sync_backend``): that rerun answers them; the run that submitted the
    batch would otherwise resubmit them and pay twice. None for any other batch."""
    if not entry or batch_id not in (entry.get("taken_over_batch_ids") or []):
        return None
    return f"canceled by the synchronous rerun {entry.get('run_id')}, which answers these requests"


def user_canceled_batches(ledger_root: PathLike, dag_id: str, partition: str) -> dict[str, str]:
    """``{batch_id: "canceled by <user>"}`` for the batches of a run that a user canceled.

    What resubmit needs to dead-letter those batches' canceled rows instead of retrying them.
    """
    found = {}
    for entry in SubmissionLedger(ledger_root).iter_entries(dag_id=dag_id, partition=partition):
        reason = user_cancel_reason(entry)
        if reason and entry.get("batch_id"):
            found[entry["batch_id"]] = reason
    return found


def cancel_by_user(entry: dict[str, Any], user: str, *, conn_id: str = DEFAULT_CONN_ID) -> dict[str, Any]:
    """Cancel the batch of a ledger entry (with ``ledger_path``) on a user's explicit request.

    Records ``canceled_by`` / ``cancel_requested_at`` / ``cancel_reason: user`` and the batch's new
    status in the entry, and returns the updated entry. Raises :class:`NotCancelable` when there is
    nothing to cancel (the cancel fields are not written then).
    """
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.hooks import AnthropicBatchHook
    from anthropic_batch.status import BatchStatus

    batch_id = entry.get("batch_id")
    if not batch_id or entry.get("mode") == "sync":
        raise NotCancelable(f"{batch_id or 'This submission'} is not a Message Batch; nothing to cancel.")
    if entry.get("state") == LedgerState.ENDED or entry.get("processing_status") == BatchStatus.ENDED:
        raise NotCancelable(f"Batch {batch_id} has already ended; nothing to cancel.")
    hook = AnthropicBatchHook(conn_id=entry.get("conn_id") or conn_id)
    current = hook.get_batch(batch_id)
    if current.processing_status != BatchStatus.IN_PROGRESS:
        # Ended, or already canceling (by the deadline, the Console or another user): nothing to do,
        # and the ledger keeps whoever asked first.
        update_entry(entry["ledger_path"], **batch_fields(current))
        ended = current.processing_status == BatchStatus.ENDED
        done = BatchStatus.ENDED.value if ended else "been asked to cancel"
        raise NotCancelable(f"Batch {batch_id} has already {done}; nothing to cancel.")
    batch = hook.cancel_batch(batch_id)
    return record_cancel(entry["ledger_path"], CancelReason.USER, by=user, batch=batch)
