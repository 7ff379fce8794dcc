"""Run batch requests through the synchronous Messages API and emit batch-format result lines.

Used where waiting for a batch is not worth it (sample-refine, ``mode=sync`` for small runs). Each
request ``{"custom_id", "params"}`` becomes one ``client.messages.create(**params)`` call at full
price, and each outcome becomes one line in exactly the Message Batches results format, so the same
collection code parses both modes:

    {"custom_id": "a", "result": {"type": "succeeded", "message": {...}}}
    {"custom_id": "b", "result": {"type": "errored", "error": {"type": "error",
        "error": {"type": "rate_limit_error", "message": "..."}, "request_id": "req_..."}}}

Retries: the SDK already retries 408/409/429/5xx/529 and connection errors with capped exponential
backoff, honouring ``retry-after`` headers. ``max_retries`` defaults to the client's own setting
(``AnthropicBatchHook.get_conn`` applies the connection's ``anthropic_client_kwargs.max_retries``, else
``hooks.DEFAULT_MAX_RETRIES``), so a configured value is not silently overridden. A request still failing
after that becomes an ``errored`` line (never an exception), so one bad request cannot sink a run and
the failure classifier can decide to resubmit it.

Concurrency: a thread pool with a bounded in-flight window (``2 x concurrency`` submitted futures),
so an iterator over 100k requests is consumed lazily and never queued in memory at once. Lines are
yielded in completion order, as batch results are (the API promises no order either).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import anthropic

from anthropic_batch.status import RETRIABLE_ERROR_TYPES, ErrorType, ResultType

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
_END = object()

# The SDK refuses a non-streaming call it expects to take over 10 minutes (judged from max_tokens)
# unless a timeout is given explicitly; batch requests have no such limit, so we give one.
_DEFAULT_TIMEOUT_S = 600.0
_MAX_TIMEOUT_S = 3600.0
_SDK_MAX_TOKENS_AT_MAX_TIMEOUT = 128_000

# Keyword arguments that messages.create accepts by name; anything else in params goes to extra_body
# so a parameter newer than the installed SDK still reaches the API, as it would in a batch.
_CREATE_KWARGS = frozenset(
    name
    for name in inspect.signature(anthropic.resources.messages.Messages.create).parameters
    if name not in {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
)


def _request_timeout(params: dict[str, Any]) -> float:
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        return _DEFAULT_TIMEOUT_S
    expected = _MAX_TIMEOUT_S * max_tokens / _SDK_MAX_TOKENS_AT_MAX_TIMEOUT
    return min(_MAX_TIMEOUT_S, max(_DEFAULT_TIMEOUT_S, expected))


def _errored(custom_id: str, error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "result": {
            "type": ResultType.ERRORED.value,
            "error": {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": request_id,
            },
        },
    }


def _error_from_exception(custom_id: str, exc: Exception) -> dict[str, Any]:
    """Turn a failed call into the errored result the Batches API would have produced."""
    if isinstance(exc, anthropic.APIStatusError):
        error_type = exc.type or _type_for_status(exc.status_code)
        message = exc.api_message or str(exc)
        return _errored(custom_id, error_type, message, exc.request_id)
    if isinstance(exc, anthropic.APIConnectionError):
        # After the SDK's retries: transient by nature, so classified like a server error.
        return _errored(custom_id, ErrorType.API_ERROR.value, f"connection error after retries: {exc}")
    # The SDK refused the request locally (bad parameter types, unknown model limits, ...).
    return _errored(custom_id, ErrorType.INVALID_REQUEST.value, f"{type(exc).__name__}: {exc}")


def _type_for_status(status_code: int) -> str:
    if status_code == 429:
        return ErrorType.RATE_LIMIT.value
    if status_code == 529:
        return ErrorType.OVERLOADED.value
    if status_code >= 500:
        return ErrorType.API_ERROR.value
    return ErrorType.INVALID_REQUEST.value


def call_one(client: anthropic.Anthropic, request: dict[str, Any]) -> dict[str, Any]:
    """One synchronous Messages call -> one result object in batch format (never raises API errors)."""
    custom_id = str(request["custom_id"])
    params = dict(request["params"])
    params.pop("stream", None)  # a batch request never streams; neither do we
    kwargs = {k: v for k, v in params.items() if k in _CREATE_KWARGS}
    extra_body = {k: v for k, v in params.items() if k not in _CREATE_KWARGS}
    try:
        response = client.messages.with_raw_response.create(
            **kwargs, extra_body=extra_body or None, timeout=_request_timeout(params)
        )
        message = response.json()
    except (anthropic.AnthropicError, ValueError, TypeError) as exc:
        return _error_from_exception(custom_id, exc)
    return {"custom_id": custom_id, "result": {"type": ResultType.SUCCEEDED.value, "message": message}}


def is_transient(line: bytes) -> bool:
    """True for an ``errored`` line whose error is transient (rate limit, overload, server error):
    the same request may well succeed a moment later, so it says nothing about the request itself."""
    result = json.loads(line).get("result") or {}
    if result.get("type") != ResultType.ERRORED:
        return False
    error = result.get("error") or {}
    return (error.get("error") or {}).get("type") in RETRIABLE_ERROR_TYPES


def _encode(result: dict[str, Any]) -> bytes:
    return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode()


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], *, concurrency: int, window: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items`` on ``concurrency`` threads, results in completion order.

    ``items`` is consumed lazily: at most ``window`` (default ``2 * concurrency``) are submitted and
    not yet handed back, so a 100k-item iterator is never queued in memory at once. Stopping early
    cancels what has not started.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    window = window or 2 * concurrency
    source = iter(items)
    in_flight: set[Future[R]] = set()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sync-runner") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < window:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    in_flight.add(pool.submit(fn, item))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            # A consumer that stops early (or an exception) must not leave queued calls running.
            for future in in_flight:
                future.cancel()


def run_requests_sync(
    requests: Iterable[dict[str, Any]],
    client: anthropic.Anthropic,
    *,
    concurrency: int = 8,
    max_retries: int | None = None,
) -> Iterator[bytes]:
    """Yield one batch-format result line per request: UTF-8 JSON bytes without the newline.

    Same contract as ``AnthropicBatchHook.iter_result_lines``, so both feed ``results.collect_lines``; a
    writer of a results JSONL file adds the ``b"\\n"``.

    ``requests`` is consumed lazily: at most ``2 * concurrency`` requests are in flight or queued.
    Per-request failures come back as ``errored`` lines; only bugs (non-SDK exceptions) raise.
    ``max_retries``: the SDK's retries per call; ``None`` keeps the client's.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    retrying_client = client if max_retries is None else client.with_options(max_retries=max_retries)
    for result in bounded_map(
        lambda request: call_one(retrying_client, request), requests, concurrency=concurrency
    ):
        yield _encode(result)
