"""Command line flags of the emulator and the settings object built from them."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ERROR_TYPES = (
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
)
HTTP_FAULT_ENDPOINTS = (
    "create",
    "create_after",
    "retrieve",
    "list",
    "cancel",
    "delete",
    "results",
    "messages",
    "count_tokens",
    "models",
)
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_API_KEY = "emulator-key"


@dataclass
class HttpFault:
    endpoint: str
    status: int
    rate: float


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8099
    db_path: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "batches_emulator.sqlite")
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    seed: int = 0
    processing_seconds: float = 5.0
    cancel_seconds: float = 0.5
    time_scale: float = 1.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_requests: int = 100_000
    max_queued_requests: int = 0
    error_rates: dict[str, float] = field(default_factory=dict)
    expired_rate: float = 0.0
    invalid_output_rate: float = 0.0
    truncate_rate: float = 0.0
    http_faults: list[HttpFault] = field(default_factory=list)
    retry_after_ms: int = 100
    early_404_seconds: float = 0.0
    drop_results_after_lines: int | None = None
    # Overrides of the per-model minimum cacheable prefix (model.CACHE_MIN_TOKENS); "*" = every model.
    cache_min_tokens: dict[str, int] = field(default_factory=dict)
    log_level: str = "warning"
    parent_pid: int | None = None


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must be within [0, 1], got {text}")
    return value


def _error_rate(text: str) -> tuple[str, float]:
    kind, _, rate = text.partition("=")
    if kind not in ERROR_TYPES or not rate:
        raise argparse.ArgumentTypeError(f"expected TYPE=RATE with TYPE in {', '.join(ERROR_TYPES)}")
    return kind, _rate(rate)


def _http_fault(text: str) -> HttpFault:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in HTTP_FAULT_ENDPOINTS:
        raise argparse.ArgumentTypeError(
            f"expected ENDPOINT:STATUS:RATE with ENDPOINT in {', '.join(HTTP_FAULT_ENDPOINTS)}"
        )
    return HttpFault(parts[0], int(parts[1]), _rate(parts[2]))


def _cache_min_tokens(text: str) -> tuple[str, int]:
    name, sep, raw = text.rpartition("=")
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MODEL=N (tokens), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a minimum must be >= 0 tokens, got {text!r}")
    return (name if sep else "*"), value


def _api_key(text: str) -> str:
    if text.startswith("sk-ant-"):
        raise argparse.ArgumentTypeError("refusing a real-looking Anthropic key; use a made-up one")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batches_emulator",
        description="Message Batches API emulator for the official anthropic SDK (loopback only).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8099, help="port (default 8099)")
    p.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite state file (default ./.emulator/emulator.sqlite); survives restarts",
    )
    p.add_argument(
        "--api-key",
        action="append",
        type=_api_key,
        dest="api_keys",
        help=f"accepted key, repeatable (default {DEFAULT_API_KEY!r})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for every random fault decision")
    p.add_argument(
        "--processing-seconds",
        type=float,
        default=5.0,
        help="real seconds a batch stays in_progress (default 5)",
    )
    p.add_argument(
        "--cancel-seconds",
        type=float,
        default=0.5,
        help="real seconds a canceled batch stays 'canceling' (default 0.5)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="emulated seconds per real second for the 24 h expiry and 29 day archive (default 1)",
    )
    p.add_argument(
        "--expire-after-seconds",
        type=float,
        default=None,
        help="shorthand: real seconds that emulate the 24 h expiry (sets --time-scale 86400/N)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="create body limit, 413 request_too_large above it (default 256 MB)",
    )
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per batch (default 100000)")
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=0,
        help="rate limit on requests still processing across all batches; a create that would "
        "exceed it gets 429 rate_limit_error (default 0 = unlimited; tier 1 is 100000)",
    )
    p.add_argument(
        "--error-rate",
        action="append",
        type=_error_rate,
        default=[],
        metavar="TYPE=RATE",
        help="fraction of batch requests that come back errored with TYPE, repeatable",
    )
    p.add_argument(
        "--expired-rate",
        type=_rate,
        default=0.0,
        help="fraction of requests never finished: the batch then runs to expires_at",
    )
    p.add_argument(
        "--invalid-output-rate",
        type=_rate,
        default=0.0,
        help="fraction of structured/tool answers whose JSON violates the schema",
    )
    p.add_argument(
        "--truncate-rate",
        type=_rate,
        default=0.0,
        help="fraction of answers cut off with stop_reason max_tokens",
    )
    p.add_argument(
        "--http-fault",
        action="append",
        type=_http_fault,
        default=[],
        metavar="ENDPOINT:STATUS:RATE",
        help="answer ENDPOINT with an HTTP error STATUS at RATE, repeatable; endpoints: "
        + ", ".join(HTTP_FAULT_ENDPOINTS)
        + " (create_after: the batch IS created, then the error is returned)",
    )
    p.add_argument(
        "--retry-after-ms", type=int, default=100, help="retry-after-ms header on injected 429s (default 100)"
    )
    p.add_argument(
        "--early-404-seconds",
        type=float,
        default=0.0,
        help="retrieve/results answer 404 for N real seconds after create",
    )
    p.add_argument(
        "--drop-results-after-lines",
        type=int,
        default=None,
        help="cut the connection after N result lines, on the first download of a batch only",
    )
    p.add_argument(
        "--cache-min-tokens",
        type=_cache_min_tokens,
        action="append",
        default=[],
        metavar="[MODEL=]N",
        help="shortest cacheable prefix in tokens, for every model (N) or one (MODEL=N; repeatable); "
        "default: each model's documented minimum (batches_emulator.model.CACHE_MIN_TOKENS)",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is gone (EmulatorProcess passes its own pid)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    time_scale = 1.0
    if args.time_scale is not None:
        time_scale = args.time_scale
    if args.expire_after_seconds is not None:
        time_scale = 86400.0 / args.expire_after_seconds
    if time_scale <= 0:
        raise SystemExit("--time-scale must be positive")
    if sum(rate for _, rate in args.error_rate) + args.expired_rate > 1.0:
        raise SystemExit("error and expired rates add up to more than 1")
    return Settings(
        host=args.host,
        port=args.port,
        db_path=args.db or Path(".emulator") / "emulator.sqlite",
        api_keys=tuple(args.api_keys or (DEFAULT_API_KEY,)),
        seed=args.seed,
        processing_seconds=args.processing_seconds,
        cancel_seconds=args.cancel_seconds,
        time_scale=time_scale,
        max_body_bytes=args.max_body_bytes,
        max_requests=args.max_requests,
        max_queued_requests=args.max_queued_requests,
        error_rates=dict(args.error_rate),
        expired_rate=args.expired_rate,
        invalid_output_rate=args.invalid_output_rate,
        truncate_rate=args.truncate_rate,
        http_faults=list(args.http_fault),
        retry_after_ms=args.retry_after_ms,
        early_404_seconds=args.early_404_seconds,
        drop_results_after_lines=args.drop_results_after_lines,
        cache_min_tokens=dict(args.cache_min_tokens),
        log_level=args.log_level,
        parent_pid=args.parent_pid,
    )
