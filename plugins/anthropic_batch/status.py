"""Status vocabulary shared by every component: per-request outcome, failure class, run mode.

``BatchStatus`` (the top-level ``processing_status`` of a Message Batch) is the official provider's
enum, re-exported so callers have one import place. It is imported lazily: the provider module pulls
in the whole ``anthropic`` SDK, which result parsing does not need.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.providers.anthropic.hooks.anthropic import BatchStatus

__all__ = [
    "DEFAULT_CONN_ID",
    "ENDED_COUNT_KEYS",
    "FAILED_COUNT_KEYS",
    "FATAL_ERROR_TYPES",
    "REQUEST_COUNT_KEYS",
    "RETRIABLE_ERROR_TYPES",
    "USER_CANCELED_ERROR_TYPE",
    "BatchStatus",
    "CancelReason",
    "ErrorType",
    "FailureClass",
    "LedgerState",
    "ProcessingStatus",
    "RequestCountKey",
    "RequestStatus",
    "ResultType",
    "RunMode",
    "fatal_api_errors",
    "transient_api_errors",
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


class LedgerState(StrEnum):
    """Lifecycle of a submission ledger entry (``state``; see ``ledger.py``)."""

    INTENT = "intent"
    SUBMITTED = "submitted"
    ENDED = "ended"


class ProcessingStatus(StrEnum):
    """``processing_status`` of a Message Batch: the same values as the provider's ``BatchStatus``.

    Mirrored here (a test keeps them equal) so modules imported at DAG parse time, the ledger and
    the UI can compare statuses without importing the provider and the SDK.
    """

    IN_PROGRESS = "in_progress"
    CANCELING = "canceling"
    ENDED = "ended"


class ResultType(StrEnum):
    """``result.type`` of one line of a batch's results file (what the API says of a request)."""

    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"


class RequestCountKey(StrEnum):
    """The buckets of a batch's ``request_counts`` (they always sum to the number of requests)."""

    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"


#: The ``request_counts`` buckets in the API's order, as plain strings (dict keys of stored JSON).
REQUEST_COUNT_KEYS: tuple[str, ...] = tuple(k.value for k in RequestCountKey)
#: The buckets of requests that ended without an answer.
FAILED_COUNT_KEYS: tuple[str, ...] = (
    RequestCountKey.ERRORED.value,
    RequestCountKey.CANCELED.value,
    RequestCountKey.EXPIRED.value,
)
#: The buckets of ended requests (all but ``processing``).
ENDED_COUNT_KEYS: tuple[str, ...] = (RequestCountKey.SUCCEEDED.value, *FAILED_COUNT_KEYS)


class ErrorType(StrEnum):
    """``error.type`` of an errored request (the API's error types we act on)."""

    API_ERROR = "api_error"
    OVERLOADED = "overloaded_error"
    RATE_LIMIT = "rate_limit_error"
    AUTHENTICATION = "authentication_error"
    PERMISSION = "permission_error"
    BILLING = "billing_error"
    INVALID_REQUEST = "invalid_request_error"


# Plain strings: the sets are handed to pyarrow compute as value sets.
#: Error types after which the same request may succeed later: resubmitted.
RETRIABLE_ERROR_TYPES = frozenset(
    e.value for e in (ErrorType.API_ERROR, ErrorType.OVERLOADED, ErrorType.RATE_LIMIT)
)
#: Error types no retry can fix (credentials, permissions, billing): the run stops.
FATAL_ERROR_TYPES = frozenset(
    e.value for e in (ErrorType.AUTHENTICATION, ErrorType.PERMISSION, ErrorType.BILLING)
)


# The SDK exception classes matching those error types; functions so that importing this module
# does not import the SDK (DAG files import it).
@cache
def transient_api_errors() -> tuple[type[Exception], ...]:
    """SDK exceptions after which the same call may succeed a moment later (429, 5xx/529, network)."""
    import anthropic

    return (anthropic.RateLimitError, anthropic.InternalServerError, anthropic.APIConnectionError)


@cache
def fatal_api_errors() -> tuple[type[Exception], ...]:
    """SDK exceptions no retry can fix: authentication, permission, billing."""
    import anthropic

    return (anthropic.AuthenticationError, anthropic.PermissionDeniedError, anthropic.PaymentRequiredError)
