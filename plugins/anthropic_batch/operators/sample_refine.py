"""SampleRefineOperator: try a seeded sample synchronously before paying for the whole run.

A batch takes up to 24 hours; finding out at the end that the prompt or the output model is wrong
wastes a day and the money. This gate sends ``sample_size`` requests, drawn with a fixed seed from
across all chunk files, through the synchronous Messages API (``sync_runner``, full price, seconds),
parses them exactly as the batch results will be parsed, and reports:

- pass rate (succeeded, valid structured output, not cut off at ``max_tokens``), stop reasons,
  token use, and every failure with its reason;
- the projected cost of the *full* run, with and without prompt caching (``project_caching``): the
  sampled mean prompt and output tokens times the number of requests, the shared prefix priced as a
  cache read, and the synchronous-price equivalent; a prefix marked for caching but below the
  model's minimum is reported (``cache_warning``). With ``use_count_tokens`` the input side
  is exact instead: ``messages.count_tokens`` over every request (free, but one API call per request,
  bounded by ``concurrency``; the prefix is then subtracted as cache reads), plus the sampled
  mean output tokens per request. In ``mode=sync`` the run is paid at the synchronous price, so that
  is the projection the budget is checked against.

It writes ``work_dir/sample/report.json``, ``report.md`` and ``report.html`` (everything from the
data or the model is escaped), each atomically, and fails the task (no retry: the outcome would not
change) with the Markdown report in the log when the pass rate is below ``min_pass_rate`` or the
projection exceeds ``max_cost_usd``. A run with no request passes trivially.

Transient API trouble is not a verdict on the prompt: a request that comes back ``errored`` with a
rate-limit, overload or server error (after the SDK's own retries) is sent again, up to
``transient_rounds`` more rounds with jittered exponential backoff, and never counts as a failed
sample. If it still fails, the task fails *retriably* (:class:`TransientSampleError`, Airflow's
normal retries), not with ``AirflowFailException``.

Answers are kept in ``work_dir/sample/answers.jsonl``, keyed by request fingerprint (a hash of the
request params), as soon as each round ends: a retry or a rerun with unchanged requests reuses them
and pays nothing for the sample again. ``report.json`` carries ``sample_cost_usd`` (the synchronous
cost of the sample's answers, whenever they were paid; ``publish`` adds it to the run's cost),
``sample_cost_paid_usd`` (what this try paid) and ``n_reused_answers``.
"""

from __future__ import annotations

import html
import json
import logging
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from anthropic_batch import layout, storage
from anthropic_batch.batch_requests import (
    canonical_json,
    iter_chunk_lines,
    iter_chunk_requests,
    read_manifest,
    sha256_hex,
)
from anthropic_batch.contracts import CacheCheck, Manifest
from anthropic_batch.errors import AnthropicBatchError
from anthropic_batch.pricing import load_price_table
from anthropic_batch.status import DEFAULT_CONN_ID, RequestStatus

if TYPE_CHECKING:
    from collections.abc import Callable

    import anthropic

# results (pyarrow), hooks and sync_runner (the anthropic SDK) are imported inside the functions that
# use them: DAG files import this module at parse time.

log = logging.getLogger(__name__)

#: Request params that ``messages.count_tokens`` takes (the rest do not change the input count).
COUNT_TOKENS_PARAMS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config")
_MAX_FAILURES_LISTED = 50
#: Extra rounds for requests that failed transiently (429/529/5xx after the SDK's own retries).
TRANSIENT_ROUNDS = 3
#: Backoff between those rounds: full jitter, doubling from the base up to the cap (seconds).
TRANSIENT_BACKOFF_BASE_S = 2.0
TRANSIENT_BACKOFF_CAP_S = 30.0
ANSWERS_FILE = "answers.jsonl"


class TransientSampleError(AnthropicBatchError, RuntimeError):
    """The API kept failing transiently for some sampled requests: retry the task later.

    Deliberately not an ``AirflowFailException``: Airflow's task retries apply, and the answers
    already received are reused by the retry.
    """


# -- sampling ---------------------------------------------------------------------------------------
def sample_positions(n_requests: int, sample_size: int, seed: int) -> list[int]:
    """Seeded positions (0-based, over all chunks in order) of the sampled requests, sorted."""
    k = max(0, min(sample_size, n_requests))
    return sorted(random.Random(seed).sample(range(n_requests), k))


def sample_requests(manifest: Manifest, sample_size: int, seed: int) -> list[dict[str, Any]]:
    """The sampled requests, read from the chunk files (only the chunks that hold one are opened)."""
    chunks = sorted(manifest.chunks, key=lambda c: c.index)
    positions = sample_positions(sum(c.n_requests for c in chunks), sample_size, seed)
    picked: list[dict[str, Any]] = []
    start = 0
    remaining = iter(positions)
    wanted = next(remaining, None)
    for chunk in chunks:
        end = start + chunk.n_requests
        if wanted is not None and wanted < end:
            for offset, request in enumerate(iter_chunk_requests(chunk.path), start=start):
                if offset == wanted:
                    picked.append(request)
                    wanted = next(remaining, None)
                    if wanted is None or wanted >= end:
                        break
        start = end
    return picked


# -- answering, with transient retries and reuse by fingerprint -------------------------------------
def request_fingerprint(request: Mapping[str, Any]) -> str:
    """What determines the answer: a hash of the request params (the custom_id does not matter)."""
    return sha256_hex(canonical_json(request["params"]))


def read_answers(path: storage.PathLike) -> dict[str, dict[str, Any]]:
    """Stored sample answers: request fingerprint -> batch-format ``result`` object."""
    answers: dict[str, dict[str, Any]] = {}
    try:
        with storage.open_binary(path) as handle:
            data = handle.read()
    except FileNotFoundError:
        return answers
    for raw in data.splitlines():
        if raw.strip():
            record = json.loads(raw)
            answers[record["request_fingerprint"]] = record["result"]
    return answers


def write_answers(path: storage.PathLike, answers: Mapping[str, Mapping[str, Any]]) -> None:
    """All answers in one atomic write (a sample is small; object stores have no append)."""
    body = b"".join(
        json.dumps({"request_fingerprint": fp, "result": result}, separators=(",", ":")).encode() + b"\n"
        for fp, result in sorted(answers.items())
    )
    storage.atomic_write_bytes(path, body)


def answer_sample(
    requests: Sequence[Mapping[str, Any]],
    client: anthropic.Anthropic,
    answers_path: storage.PathLike,
    *,
    concurrency: int,
    transient_rounds: int = TRANSIENT_ROUNDS,
    sleep: Callable[[float], None] | None = None,
) -> tuple[list[bytes], dict[str, Any]]:
    """Result lines for ``requests``: stored answers reused, the rest asked, transient errors retried.

    :returns: the result lines (one per answered request) and stats: ``n_reused``, ``reused_ids``,
        ``n_calls``, ``rounds``, ``transient`` (custom_id -> last error line, for requests still
        failing transiently).
    """
    # the anthropic SDK: kept out of DAG parsing
    import time

    from anthropic_batch.hooks import backoff_delay
    from anthropic_batch.sync_runner import is_transient, run_requests_sync

    sleep = sleep or time.sleep
    stored = read_answers(answers_path)
    fingerprints = {str(r["custom_id"]): request_fingerprint(r) for r in requests}
    lines: dict[str, bytes] = {}
    pending: list[Mapping[str, Any]] = []
    for request in requests:
        cid = str(request["custom_id"])
        result = stored.get(fingerprints[cid])
        if result is not None:
            lines[cid] = json.dumps({"custom_id": cid, "result": result}, separators=(",", ":")).encode()
        else:
            pending.append(request)
    reused_ids, n_calls, rounds = set(lines), 0, 0
    last_transient: dict[str, bytes] = {}
    while pending and rounds <= transient_rounds:
        if rounds:
            delay = backoff_delay(rounds - 1, TRANSIENT_BACKOFF_BASE_S, TRANSIENT_BACKOFF_CAP_S)
            log.warning(
                "%d sampled request(s) failed transiently; asking again in %.1fs (round %d of %d).",
                len(pending),
                delay,
                rounds + 1,
                transient_rounds + 1,
            )
            sleep(delay)
        by_id = {str(r["custom_id"]): r for r in pending}
        pending, last_transient = [], {}
        for line in run_requests_sync(list(by_id.values()), client, concurrency=concurrency):
            n_calls += 1
            record = json.loads(line)
            cid = str(record["custom_id"])
            if is_transient(line):
                pending.append(by_id[cid])
                last_transient[cid] = line
            else:
                lines[cid] = line
                stored[fingerprints[cid]] = record["result"]
        rounds += 1
        # Kept after every round, so a retried task does not pay again for what was answered.
        write_answers(answers_path, stored)
    stats = {
        "n_reused": len(reused_ids),
        "reused_ids": reused_ids,
        "n_calls": n_calls,
        "rounds": rounds,
        "transient": last_transient,
    }
    return [lines[cid] for cid in fingerprints if cid in lines], stats


# -- token counting ---------------------------------------------------------------------------------
def _count_one(client: anthropic.Anthropic, line: bytes) -> int:
    params = json.loads(line)["params"]
    kwargs = {k: params[k] for k in COUNT_TOKENS_PARAMS if k in params}
    return int(client.messages.count_tokens(**kwargs).input_tokens)


def count_input_tokens(manifest: Manifest, client: anthropic.Anthropic, *, concurrency: int) -> int:
    """Exact input tokens of every request of the run (one count_tokens call each)."""
    # the anthropic SDK: kept out of DAG parsing
    from anthropic_batch.sync_runner import bounded_map

    def lines() -> Iterator[bytes]:
        for chunk in sorted(manifest.chunks, key=lambda c: c.index):
            yield from iter_chunk_lines(chunk.path)

    return sum(bounded_map(lambda line: _count_one(client, line), lines(), concurrency=concurrency))


# -- the projection, with and without prompt caching ------------------------------------------------
def project_caching(
    manifest: Manifest,
    rows: Sequence[Mapping[str, Any]],
    n_requests: int,
    *,
    input_tokens_all: int | None = None,
) -> dict[str, Any]:
    """The run's projected cost with and without prompt caching, from the sample's usage.

    Every sampled request's prompt is ``input + cache writes + cache reads`` tokens. *Without
    caching* the whole prompt is paid as input. *With caching* the shared prefix (its length as the
    sample saw it; prepare's estimate when the sample touched no cache) is a cache read for every
    request, plus the writes: none when the sample has just written a 1-hour cache (the batches are
    submitted right after this gate, and each read refreshes the TTL), else one per chunk (the
    first request of each batch; concurrent ones may write too: hits are best effort). A prefix
    below the model's minimum is never cached, so both projections are then the same.
    """
    prices = load_price_table()
    model = str(manifest.spec.model or (rows[0].get("model") if rows else ""))
    ttl = str(manifest.spec.cache_ttl or "5m")
    n = len(rows)
    check = manifest.cache or CacheCheck()
    observed = max(
        (
            int(r.get("cache_creation_input_tokens") or 0) + int(r.get("cache_read_input_tokens") or 0)
            for r in rows
        ),
        default=0,
    )
    prefix = observed or (check.prefix_tokens if check.cacheable else 0)
    warning = check.warning
    if not warning and check.cacheable and n and not observed:
        warning = (
            f"the prefix marked for caching (about {check.prefix_tokens:,} tokens, minimum "
            f"{check.minimum:,}) was neither written nor read by the {n} sampled requests"
        )
    prompt_tokens = sum(
        int(r.get(c) or 0)
        for r in rows
        for c in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    total_input = (
        input_tokens_all
        if input_tokens_all is not None
        else (round(prompt_tokens / n * n_requests) if n else 0)
    )
    output = round(sum(int(r.get("output_tokens") or 0) for r in rows) / n * n_requests) if n else 0
    warmed = ttl == "1h" and observed > 0
    n_chunks = len(manifest.chunks)
    writes = 0 if (warmed or not prefix) else min(n_chunks, n_requests)
    cached = {
        "input_tokens": max(total_input - prefix * n_requests, 0),
        "output_tokens": output,
        "cache_creation_input_tokens": prefix * writes,
        "cache_read_input_tokens": prefix * (n_requests - writes),
    }
    plain = {"input_tokens": total_input, "output_tokens": output}

    def both(usage: Mapping[str, int]) -> dict[str, Any]:
        if not n or not model:
            return {"batch_usd": 0.0, "sync_usd": 0.0, "breakdown": None}
        batch = prices.breakdown(model, usage, batch=True, cache_ttl=ttl)
        sync = prices.breakdown(model, usage, batch=False, cache_ttl=ttl)
        return {
            "batch_usd": round(batch.total_usd, 6),
            "sync_usd": round(sync.total_usd, 6),
            "breakdown": batch.model_dump(),
        }

    return {
        "with_caching": both(cached),
        "without_caching": both(plain),
        "prefix_tokens": prefix,
        "prefix_source": "sample" if observed else ("estimate" if prefix else None),
        "cache_writes_assumed": writes,
        "warmed_by_sample": warmed,
        "cache_ttl": ttl,
        "minimum": check.minimum,
        "warning": warning,
    }


# -- the report -------------------------------------------------------------------------------------
def _passed(row: Mapping[str, Any]) -> bool:
    # loads pyarrow: kept out of DAG parsing
    from anthropic_batch.results import classify_failure

    return (
        row["status"] == RequestStatus.SUCCEEDED
        and classify_failure(row["status"], row.get("error_type"), row.get("stop_reason")) is None
    )


def _failure_reason(row: Mapping[str, Any]) -> str:
    if row["status"] == RequestStatus.SUCCEEDED and row.get("stop_reason") == "max_tokens":
        return "answer cut off at max_tokens (raise max_tokens)"
    parts = [p for p in (row.get("error_type"), row.get("error_message")) if p]
    return ": ".join(parts) or row["status"]


def build_report(
    manifest: Manifest,
    rows: Sequence[Mapping[str, Any]],
    *,
    sample_size: int,
    seed: int,
    min_pass_rate: float,
    max_cost_usd: float | None,
    input_tokens_all: int | None = None,
) -> dict[str, Any]:
    """The sample report (JSON-able) including the gate decision; see the module docstring."""
    spec = manifest.spec
    mode = manifest.mode
    # What will be paid for: the chunks' requests (answers reused from earlier runs are not sent).
    n_requests = sum(c.n_requests for c in manifest.chunks)
    n = len(rows)
    passed = sum(1 for r in rows if _passed(r))
    pass_rate = passed / n if n else None
    tokens = {
        name: sum(int(r.get(col) or 0) for r in rows)
        for name, col in (
            ("input", "input_tokens"),
            ("output", "output_tokens"),
            ("cache_creation", "cache_creation_input_tokens"),
            ("cache_read", "cache_read_input_tokens"),
        )
    }
    batch_cost = sum(float(r.get("cost_usd") or 0) for r in rows)
    sync_cost = sum(float(r.get("sync_cost_usd") or 0) for r in rows)
    projection_method = "sample_mean"
    input_all = None
    if input_tokens_all is not None and n:
        projection_method = "count_tokens_input_plus_sampled_output"
        input_all = input_tokens_all
    caching = project_caching(manifest, rows, n_requests, input_tokens_all=input_all)
    projected_batch = caching["with_caching"]["batch_usd"] if n else 0.0
    projected_sync = caching["with_caching"]["sync_usd"] if n else 0.0
    projected = projected_sync if mode == "sync" else projected_batch

    failures = [
        {
            "custom_id": r["custom_id"],
            "keys": {k: r.get(k) for k in spec.key_columns},
            "status": r["status"],
            "error_type": r.get("error_type"),
            "stop_reason": r.get("stop_reason"),
            "reason": _failure_reason(r),
        }
        for r in sorted(rows, key=lambda r: r["custom_id"])
        if not _passed(r)
    ]
    reasons = []
    if pass_rate is not None and pass_rate < min_pass_rate:
        reasons.append(f"pass rate {pass_rate:.0%} is below the minimum {min_pass_rate:.0%}")
    if max_cost_usd is not None and projected > max_cost_usd:
        reasons.append(f"projected cost ${projected:,.4f} exceeds the budget ${max_cost_usd:,.4f}")
    return {
        "pipeline": spec.pipeline,
        "partition": spec.partition,
        "model": spec.model,
        "mode": mode,
        "n_requests": n_requests,
        "sample_size": sample_size,
        "seed": seed,
        "n_sampled": n,
        "n_passed": passed,
        "pass_rate": pass_rate,
        "min_pass_rate": min_pass_rate,
        "counts_by_status": dict(sorted(Counter(r["status"] for r in rows).items())),
        "stop_reasons": dict(sorted(Counter(str(r.get("stop_reason")) for r in rows).items())),
        "tokens": tokens,
        "mean_tokens_per_request": {k: (v / n if n else 0.0) for k, v in tokens.items()},
        "sample_cost_usd": round(sync_cost, 6),
        "mean_batch_cost_per_request_usd": batch_cost / n if n else 0.0,
        "projection_method": projection_method,
        "input_tokens_all_requests": input_tokens_all,
        "projected_batch_cost_usd": round(projected_batch, 6),
        "projected_sync_cost_usd": round(projected_sync, 6),
        "projected_cost_usd": round(projected, 6),
        "projection": caching,
        "cache_warning": caching["warning"],
        "max_cost_usd": max_cost_usd,
        "failures": failures,
        "passed": not reasons,
        "gate_failures": reasons,
        "price_table_as_of": load_price_table().as_of,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def _md(text: Any) -> str:
    """Table-cell-safe Markdown text (no pipes or newlines breaking the table)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _money(value: float | None) -> str:
    return "none" if value is None else f"${value:,.4f}"


def _caching_line(report: Mapping[str, Any]) -> str:
    p = report.get("projection") or {}
    if not p:
        return "- caching: not projected"
    with_c, without = p["with_caching"], p["without_caching"]
    return (
        f"- projected batch cost with caching {_money(with_c['batch_usd'])}, without caching "
        f"{_money(without['batch_usd'])} (shared prefix {p['prefix_tokens']:,} tokens from the "
        f"{p['prefix_source'] or 'nothing: no cacheable prefix'}; "
        f"{p['cache_writes_assumed']} cache write(s) assumed"
        f"{', the sample warmed the 1 h cache' if p['warmed_by_sample'] else ''})"
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (for the task log and report.md)."""
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["gate_failures"])
    rate = "n/a" if report["pass_rate"] is None else f"{report['pass_rate']:.0%}"
    lines = [
        f"# Sample check: {_md(report['pipeline'])} {_md(report['partition'])}",
        "",
        f"**{_md(verdict)}**",
        "",
        f"- model `{_md(report['model'])}`, mode {_md(report['mode'])}, {report['n_requests']} requests",
        f"- sample: {report['n_sampled']} (seed {report['seed']}), passed {report['n_passed']} = {rate} "
        f"(minimum {report['min_pass_rate']:.0%})",
        f"- status: {_md(report['counts_by_status'])}; stop reasons: {_md(report['stop_reasons'])}",
        f"- tokens: {_md(report['tokens'])}",
        f"- projected cost of the run: {_money(report['projected_cost_usd'])} "
        f"(batch {_money(report['projected_batch_cost_usd'])}, synchronous "
        f"{_money(report['projected_sync_cost_usd'])}; {report['projection_method']}); "
        f"budget {_money(report['max_cost_usd'])}",
        _caching_line(report),
        f"- this sample cost {_money(report['sample_cost_usd'])} (synchronous price; paid by this try "
        f"{_money(report.get('sample_cost_paid_usd'))}, {report.get('n_reused_answers', 0)} answers reused); "
        f"prices as of {report['price_table_as_of']}",
    ]
    if report.get("cache_warning"):
        lines += ["", f"**Warning, prompt caching:** {_md(report['cache_warning'])}"]
    if report["failures"]:
        lines += ["", "| custom_id | status | stop reason | reason |", "|---|---|---|---|"]
        for f in report["failures"][:_MAX_FAILURES_LISTED]:
            cells = (f["custom_id"], f["status"], f["stop_reason"], f["reason"])
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
        if len(report["failures"]) > _MAX_FAILURES_LISTED:
            lines.append(f"\n... and {len(report['failures']) - _MAX_FAILURES_LISTED} more in report.json")
    return "\n".join(lines) + "\n"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as a standalone HTML page; every value is escaped."""

    def e(value: Any) -> str:
        return html.escape(str(value), quote=True)

    verdict = "Passed" if report["passed"] else "Failed: " + "; ".join(report["gate_failures"])
    rate = "n/a" if report["pass_rate"] is None else f"{report['pass_rate']:.0%}"
    facts = [
        ("Model", report["model"]),
        ("Mode", report["mode"]),
        ("Requests in the run", report["n_requests"]),
        ("Sampled (seed)", f"{report['n_sampled']} ({report['seed']})"),
        ("Pass rate (minimum)", f"{rate} ({report['min_pass_rate']:.0%})"),
        ("Status counts", report["counts_by_status"]),
        ("Stop reasons", report["stop_reasons"]),
        ("Tokens", report["tokens"]),
        ("Projected cost", _money(report["projected_cost_usd"])),
        (
            "Projected batch / synchronous",
            f"{_money(report['projected_batch_cost_usd'])} / {_money(report['projected_sync_cost_usd'])}",
        ),
        (
            "Projected batch cost with / without caching",
            f"{_money((report.get('projection') or {}).get('with_caching', {}).get('batch_usd'))} / "
            f"{_money((report.get('projection') or {}).get('without_caching', {}).get('batch_usd'))}",
        ),
        ("Prompt caching warning", report.get("cache_warning") or "none"),
        ("Budget", _money(report["max_cost_usd"])),
        ("Sample cost", _money(report["sample_cost_usd"])),
        ("Prices as of", report["price_table_as_of"]),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    failure_rows = "".join(
        f"<tr><td>{e(f['custom_id'])}</td><td>{e(f['status'])}</td><td>{e(f['stop_reason'])}</td>"
        f"<td>{e(f['reason'])}</td></tr>"
        for f in report["failures"][:_MAX_FAILURES_LISTED]
    )
    failures = (
        "<h2>Failures</h2><table><tr><th>custom_id</th><th>status</th><th>stop reason</th>"
        f"<th>reason</th></tr>{failure_rows}</table>"
        if failure_rows
        else ""
    )
    css = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        ".ok{color:#1e7e34}.bad{color:#b02a37}"
    )
    title = f"Sample check: {report['pipeline']} {report['partition']}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{css}</style></head><body><h1>{e(title)}</h1>"
        f'<p class="{"ok" if report["passed"] else "bad"}"><strong>{e(verdict)}</strong></p>'
        f"<table>{rows}</table>{failures}</body></html>\n"
    )


def write_report(sample_dir: storage.PathLike, report: Mapping[str, Any]) -> dict[str, str]:
    """report.json, report.md and report.html under ``sample_dir``, each written atomically."""
    directory = storage.as_path(sample_dir)
    paths = {
        "json": storage.atomic_write_json(directory / "report.json", report),
        "md": storage.atomic_write_bytes(directory / "report.md", render_markdown(report).encode("utf-8")),
        "html": storage.atomic_write_bytes(directory / "report.html", render_html(report).encode("utf-8")),
    }
    return {k: str(v) for k, v in paths.items()}


class SampleRefineOperator(BaseOperator):
    """
    Gate a run on a synchronous sample: pass rate and projected cost.

    :param work_dir: the run's work directory (templated).
    :param sample_size: requests to try.
    :param seed: sampling seed (same seed, same sample).
    :param min_pass_rate: fail below this fraction of passing answers.
    :param max_cost_usd: fail when the projected cost of the run exceeds this (None: no budget).
    :param use_count_tokens: project input cost from ``count_tokens`` over every request.
    :param concurrency: parallel synchronous calls.
    :param conn_id: the Anthropic connection.
    :param transient_rounds: extra rounds for requests that failed transiently (429/529/5xx).
    :returns: a small dict: passed, pass_rate, n_sampled, projected costs, report path.
    """

    template_fields: Sequence[str] = ("work_dir",)
    ui_color = "#ebdef0"

    def __init__(
        self,
        *,
        work_dir: str,
        sample_size: int = 20,
        seed: int = 0,
        min_pass_rate: float = 0.9,
        max_cost_usd: float | None = None,
        use_count_tokens: bool = False,
        concurrency: int = 4,
        conn_id: str = DEFAULT_CONN_ID,
        transient_rounds: int = TRANSIENT_ROUNDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= min_pass_rate <= 1:
            raise ValueError(f"min_pass_rate must be within [0, 1], got {min_pass_rate}")
        self.work_dir = work_dir
        self.sample_size = sample_size
        self.seed = seed
        self.min_pass_rate = min_pass_rate
        self.max_cost_usd = max_cost_usd
        self.use_count_tokens = use_count_tokens
        self.concurrency = concurrency
        self.conn_id = conn_id
        self.transient_rounds = transient_rounds

    def execute(self, context: Context) -> dict[str, Any]:
        # the anthropic SDK: kept out of DAG parsing; loads pyarrow: kept out of DAG parsing
        from anthropic_batch.hooks import AnthropicBatchHook
        from anthropic_batch.results import ParseContext, parse_result_line

        work = storage.as_path(self.work_dir)
        manifest = read_manifest(work)
        requests = sample_requests(manifest, self.sample_size, self.seed)
        rows: list[dict[str, Any]] = []
        input_tokens_all = None
        reuse: dict[str, Any] = {"n_reused": 0, "reused_ids": set(), "n_calls": 0, "transient": {}}
        if requests:
            client = AnthropicBatchHook(conn_id=self.conn_id).get_conn()
            ctx = ParseContext.from_work_dir(work, batch_id="sample", attempt=0, manifest=manifest)
            self.log.info("Sampling %d of %d requests synchronously.", len(requests), manifest.n_requests)
            lines, reuse = answer_sample(
                requests,
                client,
                layout.sample_dir(work) / ANSWERS_FILE,
                concurrency=self.concurrency,
                transient_rounds=self.transient_rounds,
            )
            if reuse["transient"]:
                examples = [parse_result_line(line, ctx) for line in list(reuse["transient"].values())[:3]]
                raise TransientSampleError(
                    f"{len(reuse['transient'])} of {len(requests)} sampled requests still failed transiently "
                    f"after {reuse['rounds']} rounds (e.g. "
                    + "; ".join(f"{r['custom_id']}: {_failure_reason(r)}" for r in examples)
                    + "). Not a verdict on the sample: the task will be retried, and the "
                    f"{len(requests) - len(reuse['transient'])} answers received are kept and reused."
                )
            if reuse["n_reused"]:
                self.log.info(
                    "Reused %d stored sample answer(s) with unchanged requests; %d call(s) made.",
                    reuse["n_reused"],
                    reuse["n_calls"],
                )
            rows = [parse_result_line(line, ctx) for line in lines]
            if self.use_count_tokens:
                input_tokens_all = count_input_tokens(manifest, client, concurrency=self.concurrency)
        report = build_report(
            manifest,
            rows,
            sample_size=self.sample_size,
            seed=self.seed,
            min_pass_rate=self.min_pass_rate,
            max_cost_usd=self.max_cost_usd,
            input_tokens_all=input_tokens_all,
        )
        report["n_reused_answers"] = reuse["n_reused"]
        paid = [r for r in rows if r["custom_id"] not in reuse["reused_ids"]]
        report["sample_cost_paid_usd"] = round(sum(float(r.get("sync_cost_usd") or 0) for r in paid), 6)
        paths = write_report(layout.sample_dir(work), report)
        markdown = render_markdown(report)
        if not report["passed"]:
            self.log.error("Sample check failed; nothing was submitted.\n%s", markdown)
            raise AirflowFailException(
                "Sample check failed: " + "; ".join(report["gate_failures"]) + f". Report: {paths['html']}"
            )
        if report["cache_warning"]:
            self.log.warning("Prompt caching: %s", report["cache_warning"])
        self.log.info("Sample check passed.\n%s", markdown)
        return {
            "passed": True,
            "pass_rate": report["pass_rate"],
            "n_sampled": report["n_sampled"],
            "projected_cost_usd": report["projected_cost_usd"],
            "projected_batch_cost_usd": report["projected_batch_cost_usd"],
            "projected_sync_cost_usd": report["projected_sync_cost_usd"],
            "sample_cost_usd": report["sample_cost_usd"],
            "report_path": paths["html"],
        }
