"""Status vocabulary shared by every component: per-request outcome, failure class, run mode.

``BatchStatus`` (the top-level ``processing_status`` of a Message Batch) is the official provider's
enum, re-exported so callers have one import place. It is imported lazily: the provider module pulls
in the whole ``anthropic`` SDK, which result parsing does not need.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.providers.anthropic.hooks.anthropic import BatchStatus

__all__ = [
    "DEFAULT_CONN_ID",
    "USER_CANCELED_ERROR_TYPE",
    "BatchStatus",
    "CancelReason",
    "FailureClass",
    "RequestStatus",
    "RunMode",
]

#: The Anthropic connection id (= ``AnthropicHook.default_conn_name``), here so operator signatures
#: need not import the hook (and the SDK) when a DAG file is parsed.
DEFAULT_CONN_ID = "anthropic_default"


def __getattr__(name: str) -> Any:
    if name == "BatchStatus":
        from airflow.providers.anthropic.hooks.anthropic import BatchStatus

        return BatchStatus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RequestStatus(StrEnum):
    """Final outcome of one request (one row of the RESULT table)."""

    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"
    # The model answered but the structured output did not validate against the output model.
    INVALID_OUTPUT = "invalid_output"
    # The answer asks for a tool call (or paused): a batch cannot continue a tool loop.
    NEEDS_FOLLOWUP = "needs_followup"
    # Submitted, but no result line came back for it.
    MISSING = "missing"


class FailureClass(StrEnum):
    """What to do with a failed request."""

    RETRIABLE = "retriable"  # resubmit (possibly with a larger max_tokens)
    PERMANENT = "permanent"  # dead-letter it; retrying would fail the same way
    FATAL = "fatal"  # stop everything: credentials, permissions or billing are wrong


class RunMode(StrEnum):
    """How a pipeline run sends its requests."""

    BATCH = "batch"
    SYNC = "sync"
    AUTO = "auto"  # resolved at prepare time from the number of requests


#: ``error_type`` of the canceled rows of a batch a user canceled: permanent, never resubmitted.
USER_CANCELED_ERROR_TYPE = "user_canceled"


class CancelReason(StrEnum):
    """Why a batch was canceled (``cancel_reason`` in its ledger entry; see ``cancel.py``)."""

    DEADLINE = "deadline"  # the sensor's deadline passed: canceled requests are retriable
    USER = "user"  # an explicit user decision: canceled requests are dead-lettered
