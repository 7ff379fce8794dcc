"""The HTTP surface: FastAPI routes, auth, version check, error bodies and HTTP fault injection."""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from batches_emulator import model
from batches_emulator.config import Settings
from batches_emulator.engine import Conflict, Engine, NotFound, random_id, rfc3339

API_VERSIONS = ("2023-06-01", "2026-10-21")
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class EmulatedConnectionDrop(ConnectionAbortedError):
    """Raised inside the results stream to cut the connection (--drop-results-after-lines)."""


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.error_type = error_type or ERROR_TYPE_BY_STATUS.get(status, "api_error")
        self.message = message
        self.headers = headers or {}


def error_response(exc: ApiError) -> JSONResponse:
    request_id = random_id("req_")
    body = {
        "type": "error",
        "error": {"type": exc.error_type, "message": exc.message},
        "request_id": request_id,
    }
    return JSONResponse(body, status_code=exc.status, headers={"request-id": request_id, **exc.headers})


def json_response(body: Any) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        media_type="application/json",
        headers={"request-id": random_id("req_")},
    )


def create_app(settings: Settings) -> FastAPI:
    engine = Engine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # checkpoints the WAL so the database is one tidy file at rest

    app = FastAPI(
        title="Message Batches API emulator",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine
    fault_rngs = {
        f.endpoint: random.Random(f"{settings.seed}:http:{f.endpoint}") for f in settings.http_faults
    }
    api_keys = set(settings.api_keys)

    def check(request: Request, endpoint: str) -> str:
        """Authenticate, check the version header, maybe inject a fault; return the API version."""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            raise ApiError(401, "x-api-key or Authorization: Bearer header is required")
        if key not in api_keys:
            raise ApiError(401, "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if version is None:
            raise ApiError(400, "anthropic-version: header is required")
        if version not in API_VERSIONS:
            raise ApiError(400, f"anthropic-version: {version!r} is not a valid version")
        maybe_fault(endpoint)
        return version

    def maybe_fault(endpoint: str) -> None:
        for fault in settings.http_faults:
            if fault.endpoint == endpoint and fault_rngs[endpoint].random() < fault.rate:
                headers = {}
                if fault.status == 429:
                    headers["retry-after-ms"] = str(settings.retry_after_ms)
                    headers["retry-after"] = str(max(1, round(settings.retry_after_ms / 1000)))
                raise ApiError(fault.status, f"injected fault on {endpoint} (emulated)", headers=headers)

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Anything unforeseen is still answered in the API's error shape, as a retryable 500.
        return error_response(ApiError(500, f"emulator error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return error_response(ApiError(404, f"Message Batch {exc} not found"))

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> Response:
        return error_response(ApiError(400, str(exc)))

    async def read_json(request: Request, limit: int) -> tuple[Any, bytes]:
        length = request.headers.get("content-length")
        if length and int(length) > limit:
            raise ApiError(413, f"Request exceeds the maximum size of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request exceeds the maximum size of {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw), raw
        except ValueError as exc:
            raise ApiError(400, f"Request body is not valid JSON: {exc}") from exc

    # -------------------------------------------------------- batches

    @app.post("/v1/messages/batches")
    async def create_batch(request: Request) -> Response:
        version = check(request, "create")
        body, raw = await read_json(request, settings.max_body_bytes)
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list):
            raise ApiError(400, "requests: Field required")
        if not 1 <= len(requests) <= settings.max_requests:
            raise ApiError(
                400, f"requests: a batch holds 1 to {settings.max_requests} requests, got {len(requests)}"
            )
        seen: set[str] = set()
        match = CUSTOM_ID.match
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not match(custom_id):
                raise ApiError(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if custom_id in seen:
                raise ApiError(400, f"requests.{i}.custom_id: duplicate custom_id {custom_id!r}")
            seen.add(custom_id)
            if not isinstance(item.get("params"), dict):
                raise ApiError(400, f"requests.{i}.params: Field required")
        limit = settings.max_queued_requests
        if limit and engine.queued_requests() + len(requests) > limit:
            raise ApiError(
                429,
                f"Number of queued batch requests would exceed the rate limit of {limit}",
                headers={"retry-after-ms": str(settings.retry_after_ms)},
            )
        view = engine.create_batch(raw, len(requests), version)
        maybe_fault("create_after")
        return json_response(view)

    @app.get("/v1/messages/batches")
    async def list_batches(request: Request) -> Response:
        check(request, "list")
        q = request.query_params
        try:
            limit = int(q.get("limit", 20))
        except ValueError as exc:
            raise ApiError(400, "limit: Input should be a valid integer") from exc
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: must be between 1 and 1000")
        if q.get("after_id") and q.get("before_id"):
            raise ApiError(400, "after_id and before_id cannot both be set")
        return json_response(
            engine.list_batches(limit, q.get("after_id"), q.get("before_id"), base_url(request))
        )

    def early_404(batch_id: str) -> None:
        if settings.early_404_seconds and engine.seconds_since_create(batch_id) < settings.early_404_seconds:
            raise NotFound(batch_id)

    @app.get("/v1/messages/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> Response:
        check(request, "retrieve")
        early_404(batch_id)
        return json_response(engine.retrieve(batch_id, base_url(request)))

    @app.post("/v1/messages/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        check(request, "cancel")
        return json_response(engine.cancel(batch_id, base_url(request)))

    @app.delete("/v1/messages/batches/{batch_id}")
    async def delete_batch(batch_id: str, request: Request) -> Response:
        check(request, "delete")
        return json_response(engine.delete(batch_id))

    @app.get("/v1/messages/batches/{batch_id}/results")
    async def batch_results(batch_id: str, request: Request) -> Response:
        check(request, "results")
        early_404(batch_id)
        view, earlier_downloads = engine.results_status(batch_id)
        if view["processing_status"] != "ended":
            raise ApiError(400, f"Message Batch {batch_id} has not ended; results are not available yet")
        if view["archived_at"] is not None:
            raise ApiError(404, f"Message Batch {batch_id} was archived; its results are no longer available")
        drop_after = settings.drop_results_after_lines if earlier_downloads == 0 else None
        return StreamingResponse(
            stream_results(batch_id, drop_after),
            media_type="application/binary",
            headers={"request-id": random_id("req_")},
        )

    async def stream_results(batch_id: str, drop_after: int | None) -> AsyncIterator[bytes]:
        sent = 0
        for part in engine.result_parts(batch_id):
            if drop_after is not None and sent + part.count(b"\n") >= drop_after:
                cut = 0
                for _ in range(drop_after - sent):
                    cut = part.index(b"\n", cut) + 1
                # N whole lines and half of the next one, as a real cut connection would leave.
                next_end = part.find(b"\n", cut)
                cut += max(0, next_end - cut) // 2
                yield part[:cut]
                # Abort mid-body: the server closes the connection without ending the chunked body.
                raise EmulatedConnectionDrop(f"emulated connection drop after {drop_after} lines")
            sent += part.count(b"\n")
            yield part

    # -------------------------------------------------------- messages and models

    @app.post("/v1/messages")
    async def create_message(request: Request) -> Response:
        version = check(request, "messages")
        params, _ = await read_json(request, 32 * 1024 * 1024)
        try:
            return json_response(engine.message(params, version))
        except model.RequestInvalid as exc:
            raise ApiError(404 if exc.error_type == "not_found_error" else 400, str(exc)) from exc

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        check(request, "count_tokens")
        params, _ = await read_json(request, 32 * 1024 * 1024)
        if isinstance(params, dict):
            params = {"max_tokens": 1, **params}
        try:
            _, prompt = model.validate_params(
                params, api_version=model.VERSION_WITHOUT_SAMPLING, in_batch=False
            )
        except model.RequestInvalid as exc:
            raise ApiError(404 if exc.error_type == "not_found_error" else 400, str(exc)) from exc
        return json_response({"input_tokens": prompt.total})

    def model_info(model_id: str) -> dict[str, Any]:
        name, released, context, max_tokens = model.MODELS[model_id]
        return {
            "type": "model",
            "id": model_id,
            "display_name": name,
            "created_at": released,
            "lifecycle": "active",
            "max_input_tokens": context,
            "max_tokens": max_tokens,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        check(request, "models")
        q = request.query_params
        ids = list(model.MODELS)  # newest first, as listed
        limit = int(q.get("limit", 20))
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: must be between 1 and 1000")
        if q.get("after_id") in ids:
            ids = ids[ids.index(q["after_id"]) + 1 :]
            page, has_more = ids[:limit], len(ids) > limit
        elif q.get("before_id") in ids:
            ids = ids[: ids.index(q["before_id"])]
            page, has_more = ids[-limit:], len(ids) > limit
        else:
            page, has_more = ids[:limit], len(ids) > limit
        data = [model_info(m) for m in page]
        return json_response(
            {
                "data": data,
                "has_more": has_more,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
            }
        )

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str, request: Request) -> Response:
        check(request, "models")
        resolved = model.resolve_model(model_id)
        if resolved is None:
            raise ApiError(404, f"model: {model_id}")
        return json_response(model_info(resolved))

    @app.get("/healthz")
    async def health() -> Response:
        return json_response({"ok": True, "time": rfc3339(engine.now())})

    return app
