"""AnthropicBatchHook: the provider's AnthropicHook plus what a large batch pipeline needs.

- ``create_batch_from_chunk`` streams the request body from a chunk file (never built in memory)
  and never lets a retry create a second batch: an ambiguous failure (connection drop, timeout,
  5xx after the body was sent) is resolved by looking for the batch in the listing first.
- ``iter_result_lines`` yields raw JSONL result lines, resumes a dropped download without
  duplicates, and always closes the response.
- ``find_orphan_batches`` finds batches a dead worker may have created (orphan recovery).
- ``aget_batch`` / ``acancel_batch`` use the async client, for the triggerer's event loop.

The connection is the provider's: type ``anthropic``, API key in *password*, base URL in *host*.
Only the provider's public API is used: ``get_conn`` / ``get_async_conn`` build the clients,
``get_batch`` / ``cancel_batch`` / ``list_batches`` call the API with the provider's platform check
(the Message Batches API exists on the ``anthropic`` and ``aws`` platforms only), and the
connection is read through the public ``get_connection``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar

import anthropic
import httpx2
from airflow.providers.anthropic.exceptions import AnthropicError
from airflow.providers.anthropic.hooks.anthropic import FIRST_PARTY_PLATFORMS, AnthropicHook
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from anthropic.types.messages import MessageBatch

from anthropic_batch.batch_requests import iter_batch_body
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.status import fatal_api_errors, transient_api_errors

#: SDK retries for plain reads (retrieve, list, cancel). The SDK backs off exponentially (capped at
#: 8 s) and honours retry-after; 4 retries ride out a short overload without hiding an outage.
DEFAULT_MAX_RETRIES = 4

#: Statuses after which the server definitely did not create anything, so a create can be resent.
_REJECTED_BEFORE_CREATE = (anthropic.RateLimitError, anthropic.OverloadedError)
#: Failures after which we cannot know whether the server created the batch.
_AMBIGUOUS_CREATE = (anthropic.APIConnectionError, anthropic.InternalServerError)
#: Auth / billing problems: retrying never helps.
FATAL_ERRORS = fatal_api_errors()

# A result line starts with its custom_id in practice; custom ids are [A-Za-z0-9_-]{1,64}, so no escapes.
_CUSTOM_ID_PREFIX = re.compile(rb'^\s*\{\s*"custom_id"\s*:\s*"([A-Za-z0-9_-]{1,64})"')

T = TypeVar("T")


class BatchCreateError(AnthropicBatchError, RuntimeError):
    """The batch could not be created, or whether it was created could not be decided."""


class AmbiguousCreateError(BatchCreateError):
    """The create request was sent but failed without an answer: the batch may or may not exist."""

    def __init__(self, message: str, *, started: datetime) -> None:
        super().__init__(message)
        self.started = started


class ResultsDownloadError(AnthropicBatchError, RuntimeError):
    """The results stream kept failing after bounded retries."""


def custom_id_of(line: bytes) -> str:
    """Return the ``custom_id`` of a raw result line (regex fast path, JSON fallback)."""
    match = _CUSTOM_ID_PREFIX.match(line)
    if match:
        return match.group(1).decode("ascii")
    return str(json.loads(line)["custom_id"])


def total_requests(batch: MessageBatch) -> int:
    """Total number of requests of a batch (the counts always sum to it)."""
    counts = batch.request_counts
    return counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired


def retry_after_seconds(error: Exception, default: float) -> float:
    """Seconds the server asked us to wait (``retry-after-ms`` / ``retry-after``), else ``default``."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        if "retry-after" in headers:
            return max(0.0, float(headers["retry-after"]))
    except ValueError:
        pass
    return default


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [base/2, min(cap, base * 2**attempt)]."""
    high = min(cap, base * (2**attempt))
    return random.uniform(min(base / 2, high), high)


def split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Split a byte stream into lines; yields ``(line_without_newline, terminated)``.

    The last item is unterminated when the stream did not end with a newline: a clean end of stream
    makes it a valid last line, a dropped stream makes it a fragment the caller must discard.
    """
    buffer = b""
    for chunk in chunks:
        if not chunk:
            continue
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line, True
    if buffer.strip():
        yield buffer, False


class AnthropicBatchHook(AnthropicHook):
    """
    The Anthropic hook for Message Batches at scale.

    Same connection as the provider's :class:`AnthropicHook` (``anthropic`` type: key in password,
    base URL in host). The SDK's ``max_retries`` defaults to :data:`DEFAULT_MAX_RETRIES` unless the
    connection's ``extra.anthropic_client_kwargs.max_retries`` sets it.

    :param conn_id: the Anthropic connection id.
    :param sleep: the sleep function used between our own retries (tests pass a fast one).
    """

    hook_name = "Anthropic (batches)"

    def __init__(
        self,
        conn_id: str = AnthropicHook.default_conn_name,
        *,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id=conn_id, **kwargs)
        self._sleep = sleep
        self._extra: dict[str, Any] | None = None  # the connection's extra, read once

    # -- clients ---------------------------------------------------------------------------------
    def _connection_extra(self) -> dict[str, Any]:
        if self._extra is None:
            self._extra = dict(self.get_connection(self.conn_id).extra_dejson)
        return self._extra

    @staticmethod
    def _with_retry_policy(client: T, extra: dict[str, Any]) -> T:
        """``client`` with :data:`DEFAULT_MAX_RETRIES` unless the connection sets ``max_retries``."""
        if (extra.get("anthropic_client_kwargs") or {}).get("max_retries") is None:
            return client.with_options(max_retries=DEFAULT_MAX_RETRIES)  # type: ignore[attr-defined]
        return client

    def _require_batches_api(self, platform: str | None = None) -> None:
        """The provider's platform rule for the Message Batches API, for the calls it has no method for."""
        platform = platform or (self._connection_extra().get("platform") or "anthropic").lower()
        if platform not in FIRST_PARTY_PLATFORMS:
            raise AnthropicError(
                f"The Message Batches API is not available on the {platform!r} platform (connection "
                f"{self.conn_id!r}). Use the first-party Anthropic API (platform='anthropic') or "
                "Claude Platform on AWS (platform='aws')."
            )

    def get_conn(self) -> anthropic.Anthropic:
        return self._with_retry_policy(super().get_conn(), self._connection_extra())

    async def get_async_conn(self, *, shared_http: bool = False) -> anthropic.AsyncAnthropic:
        """
        The async client. ``shared_http=True`` builds it on the event loop's shared HTTP pool
        (:func:`shared_async_http_client`); such a client must NOT be closed by the caller.

        The shared pool needs the client built around it, which the provider's public builder does
        not offer: for an API key (or environment credentials) on the ``anthropic`` platform, the
        case of the poll triggers, the client is built here from the same connection fields the
        provider reads (key in *password*, base URL in *host*, ``anthropic_client_kwargs``); any
        other configuration (workload identity, ``aws``) gets the provider's client, on its own pool.
        """
        conn = await get_async_connection(self.conn_id, hook=self)
        extra = self._extra = dict(await get_async_extra_dejson(conn))
        platform = (extra.get("platform") or "anthropic").lower()
        if shared_http:
            self._require_batches_api(platform)
        if shared_http and platform == "anthropic" and not extra.get("workload_identity"):
            kwargs = dict(extra.get("anthropic_client_kwargs") or {})
            base_url = kwargs.pop("base_url", None) or conn.host or None
            api_key = kwargs.pop("api_key", None) or conn.password or None
            if api_key:
                kwargs["api_key"] = api_key
            http = shared_async_http_client()
            client = anthropic.AsyncAnthropic(base_url=base_url, http_client=http, **kwargs)
        else:
            client = await super().get_async_conn()
        return self._with_retry_policy(client, extra)

    # -- create ----------------------------------------------------------------------------------
    def create_batch_from_chunk(self, chunk_path: Any, *, max_attempts: int = 5) -> MessageBatch:
        """
        Create a batch whose body is streamed from a chunk file (one request per line).

        The body comes from :func:`batch_requests.iter_batch_body`, re-iterable so that each
        attempt re-reads the file from the start; it is never held in memory whole.

        The SDK's own retries are off for this call: it would resend the body after a dropped
        connection or a 5xx, and if the first send had created a batch we would pay twice.
        We resend only after 429/529 (the server refused before creating anything). An ambiguous
        failure (connection lost, timeout, 5xx: the batch may or may not exist) raises
        :class:`AmbiguousCreateError`; the ledger policy then looks for the batch before any resend.
        """

        self._require_batches_api()
        body = iter_batch_body(chunk_path)
        # A declared length (one cheap pass over the file) instead of chunked transfer encoding:
        # proxies handle it better and an oversized body is refused before it is uploaded.
        headers = {"content-type": "application/json", "content-length": str(body.n_bytes)}
        client = self.conn.with_options(max_retries=0)
        for attempt in range(max_attempts):
            started = datetime.now(UTC)
            try:
                return client.post(
                    "/v1/messages/batches",
                    content=body,
                    cast_to=MessageBatch,
                    options={"headers": headers},
                )
            except FATAL_ERRORS:
                raise
            except _REJECTED_BEFORE_CREATE as err:
                if attempt == max_attempts - 1:
                    raise
                delay = retry_after_seconds(err, backoff_delay(attempt, 2.0, 60.0))
                self.log.warning("Create refused (%s); retrying in %.1fs.", type(err).__name__, delay)
                self._sleep(delay)
            except _AMBIGUOUS_CREATE as err:
                raise AmbiguousCreateError(
                    f"Creating a batch from {chunk_path} failed after the request was sent "
                    f"({type(err).__name__}: {err}); the batch may exist. Not resending blindly.",
                    started=started,
                ) from err
        raise BatchCreateError(f"Could not create a batch from {chunk_path} in {max_attempts} attempts.")

    # -- reads -----------------------------------------------------------------------------------
    def _retry_not_found(self, call: Callable[[], T], *, what: str, attempts: int = 5) -> T:
        """Run ``call``, retrying a 404: just after create, reads can briefly 404 (a known API quirk)."""
        for attempt in range(attempts):
            try:
                return call()
            except anthropic.NotFoundError:
                if attempt == attempts - 1:
                    raise
                delay = backoff_delay(attempt, 1.0, 10.0)
                self.log.info("%s returned 404 (attempt %d); retrying in %.1fs.", what, attempt + 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def get_batch(self, batch_id: str) -> MessageBatch:
        """Retrieve a batch (the provider's, with its platform check), tolerating the early 404
        just after create."""
        retrieve = super().get_batch
        return self._retry_not_found(lambda: retrieve(batch_id), what=f"retrieve {batch_id}")

    def iter_result_lines(self, batch_id: str, *, max_resumes: int = 5) -> Iterator[bytes]:
        """
        Yield the raw JSONL result lines of an ended batch (without the newline), each line once.

        If the download drops halfway it is started again and lines whose ``custom_id`` was
        already yielded are skipped, up to ``max_resumes`` times. The response is closed on every
        exit path (the SDK's reader would otherwise keep the connection open after a read error).
        If the stream ends cleanly with fewer lines than the batch has requests, that is also
        treated as a drop; after the last resume the missing ones are left to the caller (they
        become ``missing`` rows), with a warning.
        """
        self._require_batches_api()
        batches = self.conn.messages.batches.with_streaming_response
        seen: set[str] = set()
        expected: int | None = None
        failures = 0
        while True:
            try:
                with ExitStack() as stack:
                    # results() retrieves the batch, then GETs its results_url; the request is sent
                    # when the context is entered, so that is what the 404 retry wraps.
                    response = self._retry_not_found(
                        lambda: stack.enter_context(batches.results(batch_id)),
                        what=f"results of {batch_id}",
                    )
                    if expected is None:
                        expected = self._expected_lines(batch_id)
                    for line, terminated in split_lines(response.iter_bytes()):
                        cid = custom_id_of(line) if terminated else self._last_line_id(line)
                        if cid in seen:
                            continue
                        seen.add(cid)
                        yield line
            except Exception as err:
                if not _is_stream_drop(err):
                    raise
                failures += 1
                if failures > max_resumes:
                    raise ResultsDownloadError(
                        f"Results of {batch_id} kept failing after {max_resumes} resumes "
                        f"({len(seen)} lines received): {err}"
                    ) from err
                self.log.warning(
                    "Results stream of %s dropped after %d lines (%s); resuming.", batch_id, len(seen), err
                )
                self._sleep(backoff_delay(failures - 1, 1.0, 15.0))
                continue
            if expected is not None and len(seen) < expected:
                if failures < max_resumes:
                    failures += 1
                    self.log.warning(
                        "Results stream of %s ended after %d of %d lines; downloading again.",
                        batch_id,
                        len(seen),
                        expected,
                    )
                    continue
                self.log.warning(
                    "Results of %s: %d of %d lines after %d resumes; the rest will count as missing.",
                    batch_id,
                    len(seen),
                    expected,
                    failures,
                )
            return

    def _expected_lines(self, batch_id: str) -> int | None:
        try:
            return total_requests(self.get_batch(batch_id))
        except anthropic.APIError:
            return None

    @staticmethod
    def _last_line_id(line: bytes) -> str:
        """custom_id of an unterminated last line; a fragment that is not valid JSON is a drop."""
        try:
            json.loads(line)
        except ValueError as err:
            raise _StreamFragment("stream ended inside a line") from err
        return custom_id_of(line)

    # -- orphans ---------------------------------------------------------------------------------
    def find_orphan_batches(self, created_after: datetime, n_requests: int) -> list[MessageBatch]:
        """
        Batches created at or after ``created_after`` whose total request count is ``n_requests``.

        The listing is newest first; it stops at the first batch older than ``created_after``.
        """
        if created_after.tzinfo is None:
            raise ValueError("created_after must be timezone-aware")
        found: list[MessageBatch] = []
        for batch in self.list_batches(limit=100):
            if batch.created_at < created_after:
                break
            if total_requests(batch) == n_requests:
                found.append(batch)
        return found

    # -- async (triggerer) -----------------------------------------------------------------------
    async def aget_batch(self, batch_id: str) -> MessageBatch:
        """Retrieve a batch with the async client (one attempt per SDK retry policy; closes the client)."""
        client = await self.get_async_conn()
        async with client:
            self._require_batches_api()
            return await client.messages.batches.retrieve(batch_id)

    async def acancel_batch(self, batch_id: str) -> MessageBatch:
        """Cancel a batch with the async client (closes the client)."""
        client = await self.get_async_conn()
        async with client:
            self._require_batches_api()
            return await client.messages.batches.cancel(batch_id)


#: Polls are short: a few dozen pooled connections serve hundreds of triggers, and a small pool keeps
#: httpcore's per-request scan of its connections cheap.
SHARED_POOL_LIMITS = httpx2.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=30)

_SHARED_ASYNC_HTTP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx2.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def shared_async_http_client() -> httpx2.AsyncClient:
    """One pooled HTTP client per event loop.

    A triggerer runs hundreds of triggers in one loop; a new SDK client per trigger costs ~20 ms of
    CPU (its TLS context) and its own connection pool, so the poll triggers share one.
    """
    loop = asyncio.get_running_loop()
    client = _SHARED_ASYNC_HTTP.get(loop)
    if client is None or client.is_closed:
        client = anthropic.DefaultAsyncHttpxClient(limits=SHARED_POOL_LIMITS)
        _SHARED_ASYNC_HTTP[loop] = client
    return client


class _StreamFragment(Exception):
    """The results stream ended in the middle of a line."""


def _is_stream_drop(err: Exception) -> bool:
    """True when a results download failed in a way a new download can fix.

    While the body is iterated, read errors arrive as raw httpx2 transport errors, not wrapped.
    """
    return isinstance(
        err, (*transient_api_errors(), _StreamFragment, httpx2.TransportError, httpx2.StreamError)
    )
