"""Collecting batch results: the fast path vs a bare ``json.loads`` loop vs the SDK's objects.

100,000 realistic ``succeeded`` result lines (~100 MB of JSONL: Messages with usage and a JSON
answer for a pydantic output model) and a prepared work dir (manifest spec, keys.parquet) are
written to a temp dir; then, side by side in one run, interleaved, best of ``BENCH_COLLECT_ROUNDS``:

- (a)  fast: ``ParseContext.from_work_dir`` + ``results.collect_lines`` -> RESULT Parquet (msgspec
       decode into small structs, pydantic-core validation of every answer's JSON text, the valid
       text kept as output_json, Arrow columns, atomic write);
- (a0) the same without an output model (parse, price, write);
- (b)  bare: ``json.loads`` of every line and nothing else (the floor of a Python JSON parser);
- (c)  sdk: what ``client.messages.batches.results()`` does per line (``json.loads``, then
       ``construct_type_unchecked(MessageBatchIndividualResponse)``, see ``anthropic/_decoders``;
       its chunk splitting is left out, which favours the SDK), then what a user would do with
       the objects: ``Model.model_validate_json(text)`` (text kept when valid), dict rows, the
       same Parquet file; (c0) the same without validation. Outputs of (a)/(c) are compared.

Targets (with the output model, the pipeline's real case): (c) >= 7x slower than (a); (a) within
1.5x of (b); peak RSS (VmHWM) of a fresh process that imports, loads the 100k keys and runs (a)
< 200 MB. The no-model ratios are printed for information; memory is reported by stage, also for a
process that imported Airflow first (as a worker has). Run: ``python -m benchmarks bench_collect``
(env BENCH_COLLECT_LINES, BENCH_COLLECT_ROUNDS).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "plugins", REPO / "include", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow" / "bench"))

N_LINES = int(os.environ.get("BENCH_COLLECT_LINES", "100000"))
ROUNDS = int(os.environ.get("BENCH_COLLECT_ROUNDS", "3"))
MODEL = "claude-haiku-4-5"
WORDS = [
    "invoice",
    "payment",
    "overdue",
    "customer",
    "account",
    "refund",
    "shipping",
    "delayed",
    "damaged",
    "package",
    "support",
    "request",
    "escalation",
    "priority",
    "billing",
    "address",
    "update",
    "subscription",
    "cancel",
    "renewal",
    "discount",
]

# The output model the answers are validated against (kept here so the child process can import it).
OUTPUT_MODEL_REF = "schemas/tickets.py:TicketExtraction"
OUTPUT_MODEL_SOURCE = '''
from pydantic import BaseModel, Field


class TicketExtraction(BaseModel):
    """A support ticket, classified."""

    category: str
    urgency: int = Field(ge=1, le=5)
    sentiment: str
    summary: str
    tags: list[str]
    customer_id: str | None = None
    needs_human: bool
'''


def _answer(rng: random.Random, i: int) -> str:
    return json.dumps(
        {
            "category": rng.choice(["billing", "shipping", "account", "technical"]),
            "urgency": rng.randint(1, 5),
            "sentiment": rng.choice(["negative", "neutral", "positive"]),
            "summary": " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 35))),
            "tags": [rng.choice(WORDS) for _ in range(rng.randint(2, 5))],
            "customer_id": f"C{i:07d}",
            "needs_human": rng.random() < 0.2,
        }
    )


def _result_line(rng: random.Random, i: int) -> bytes:
    message = {
        "id": f"msg_{i:024x}",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": _answer(rng, i)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": rng.randint(300, 1200),
            "output_tokens": rng.randint(80, 200),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1800,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "service_tier": "batch",
            "server_tool_use": None,
        },
    }
    return json.dumps(
        {"custom_id": f"T{i:07d}", "result": {"type": "succeeded", "message": message}}
    ).encode()


def generate(directory: Path, n: int) -> Path:
    """Write ``n`` result lines, the output model file and a keys file; returns the JSONL path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    path = directory / "results.jsonl"
    with path.open("wb") as f:
        for i in range(n):
            f.write(_result_line(rng, i) + b"\n")
    (directory / "schemas").mkdir(exist_ok=True)
    (directory / "schemas" / "tickets.py").write_text(OUTPUT_MODEL_SOURCE)
    # The prepared work dir's part collect reads (ARCHITECTURE.md): the manifest's spec and the keys.
    (directory / "requests").mkdir(exist_ok=True)
    ids = [f"T{i:07d}" for i in range(n)]
    fingerprints = [f"{rng.getrandbits(256):064x}" for _ in range(n)]
    pq.write_table(
        pa.table(
            {
                "custom_id": ids,
                "ticket_id": ids,
                "request_fingerprint": fingerprints,
                "chunk_index": pa.array([0] * n, pa.int32()),
            }
        ),
        directory / "requests" / "keys.parquet",
    )
    spec = {
        "pipeline": "bench",
        "model": MODEL,
        "output_model": OUTPUT_MODEL_REF,
        "output_mode": "json_schema",
        "include_dir": str(directory),
        "key_columns": ["ticket_id"],
    }
    (directory / "requests" / "manifest.json").write_text(
        json.dumps({"chunks": [], "n_requests": n, "spec": spec})
    )
    return path


def _context(directory: Path):
    """The parse context as the collect operator makes it: ``ParseContext.from_work_dir``.

    Prices are ``pricing.builtin_price_table()``: ``load_price_table()`` would also look up an Airflow
    Variable (importing Airflow) for the same numbers here.
    """
    from anthropic_batch.pricing import builtin_price_table
    from anthropic_batch.results import ParseContext

    return ParseContext.from_work_dir(
        directory, batch_id="msgbatch_bench", attempt=1, chunk_indices=[0], prices=builtin_price_table()
    )


def _iter_file_lines(path: Path):
    with path.open("rb") as f:
        yield from f


def run_fast(path: Path, out: Path, ctx) -> int:
    from anthropic_batch.results import collect_lines

    return collect_lines(_iter_file_lines(path), str(out), ctx).n_rows


def run_bare(path: Path) -> int:
    n = 0
    loads = json.loads
    for line in _iter_file_lines(path):
        loads(line)
        n += 1
    return n


def run_sdk(path: Path, out: Path, ctx, keys: dict) -> int:
    """The SDK's per-line object construction, then the same rows, validation and Parquet file.

    ``keys`` is a plain dict custom_id -> (key values, fingerprint). Without an output model in
    ``ctx`` the answers are not validated (as in (a0)).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from anthropic._models import construct_type_unchecked
    from anthropic.types.messages import MessageBatchIndividualResponse
    from pydantic import ValidationError

    from anthropic_batch.output_models import format_validation_error
    from anthropic_batch.results import result_schema

    schema = result_schema(ctx.key_columns)
    rows: list[dict] = []
    n = 0
    with pq.ParquetWriter(str(out), schema) as writer:
        for line in _iter_file_lines(path):
            resp = construct_type_unchecked(value=json.loads(line), type_=MessageBatchIndividualResponse)
            result = resp.result
            key_values, fingerprint = keys[resp.custom_id]
            row = {"custom_id": resp.custom_id, "ticket_id": key_values[0], "status": result.type}
            if result.type == "succeeded":
                msg = result.message
                text = "".join(b.text for b in msg.content if b.type == "text")
                output_json = error = None
                if ctx.output_model is not None:
                    # What a user would write: validate the answer text, keep it when valid.
                    try:
                        ctx.output_model.model_validate_json(text)
                        output_json = text
                    except ValidationError as exc:
                        error = format_validation_error(exc)
                u = msg.usage
                # The same float arithmetic as (a), so only the object construction differs.
                r_in, r_out, _, r_w1h, r_read = ctx.rates(msg.model)
                sync_cost = (
                    u.input_tokens * r_in
                    + u.output_tokens * r_out
                    + (u.cache_creation_input_tokens or 0) * r_w1h
                    + (u.cache_read_input_tokens or 0) * r_read
                )
                batch_cost = sync_cost * ctx._discount
                row.update(
                    status="succeeded" if error is None else "invalid_output",
                    error_message=error,
                    output_text=text,
                    output_json=output_json,
                    stop_reason=msg.stop_reason,
                    model=msg.model,
                    input_tokens=u.input_tokens,
                    output_tokens=u.output_tokens,
                    cache_creation_input_tokens=u.cache_creation_input_tokens,
                    cache_read_input_tokens=u.cache_read_input_tokens,
                    cost_usd=batch_cost,
                    sync_cost_usd=sync_cost,
                )
            row.update(batch_id=ctx.batch_id, attempt=ctx.attempt, request_fingerprint=fingerprint)
            rows.append(row)
            n += 1
            if len(rows) >= 10_000:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows.clear()
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return n


def _interleaved_best(variants: dict, rounds: dict) -> dict[str, tuple[float, int]]:
    """Best time per variant, running the variants in turn each round (fair under changing load)."""
    best = {name: (float("inf"), 0) for name in variants}
    for round_index in range(max(rounds.values())):
        for name, fn in variants.items():
            if round_index >= rounds[name]:
                continue
            t0 = time.perf_counter()
            n = fn()
            elapsed = time.perf_counter() - t0
            if elapsed < best[name][0]:
                best[name] = (elapsed, n)
    return best


def peak_rss_mb() -> float:
    """This process's peak RSS in MB.

    ``VmHWM`` from /proc (Linux): it belongs to the process image, whereas ``ru_maxrss`` is carried
    over from the parent across fork+exec and would report the benchmark's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_main(directory: str, path: str, preload_airflow: bool) -> None:
    """Run (a) once in this (fresh) interpreter; print its memory figures as JSON."""
    if preload_airflow:  # as in an Airflow worker, which has imported it before any task runs
        import airflow.sdk  # noqa: F401
    import pyarrow as pa

    import anthropic_batch.results  # noqa: F401

    pa.array([0])  # pyarrow imports pandas on its first list conversion: count it with the imports
    imports = _rss_mb()
    d = Path(directory)
    ctx = _context(d)
    keys = _rss_mb()
    n = run_fast(Path(path), d / "child.parquet", ctx)
    print(
        json.dumps(
            {
                "rows": n,
                "rss_imports_mb": imports,
                "rss_keys_mb": keys,
                "peak_rss_mb": peak_rss_mb(),
                "airflow_imported": "airflow" in sys.modules,
            }
        )
    )


def _child_peak_rss(directory: Path, path: Path, preload_airflow: bool = False) -> dict:
    """Run (a) once in a fresh interpreter; its own peak RSS and RSS at stages before collecting."""
    code = (
        "import sys\n"
        f"sys.path[:0] = {[str(REPO / 'plugins'), str(REPO / 'include'), str(REPO)]!r}\n"
        "from benchmarks import bench_collect as b\n"
        f"b.child_main({str(directory)!r}, {str(path)!r}, {preload_airflow!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    import dataclasses

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="bench_collect_") as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        path = generate(directory, N_LINES)
        size_mb = path.stat().st_size / 1e6
        print(f"generated {N_LINES:,} result lines, {size_mb:.1f} MB, in {time.perf_counter() - t0:.1f}s")
        ctx = _context(directory)
        plain_ctx = dataclasses.replace(ctx, output_model=None, output_mode=None)
        # The SDK side looks keys up in a plain dict, as a user would (built here, untimed like ctx).
        sdk_keys = dict(ctx.keys.items())

        sdk_rounds = ROUNDS  # best of as many rounds as the fast side: no advantage from fewer draws
        best = _interleaved_best(
            {
                "a": lambda: run_fast(path, directory / "a.parquet", ctx),
                "a0": lambda: run_fast(path, directory / "a0.parquet", plain_ctx),
                "b": lambda: run_bare(path),
                "c": lambda: run_sdk(path, directory / "c.parquet", ctx, sdk_keys),
                "c0": lambda: run_sdk(path, directory / "c0.parquet", plain_ctx, sdk_keys),
            },
            {"a": ROUNDS, "a0": ROUNDS, "b": ROUNDS, "c": sdk_rounds, "c0": sdk_rounds},
        )
        assert {n for _, n in best.values()} == {N_LINES}, best
        for fast, sdk in (("a", "c"), ("a0", "c0")):  # same rows either way
            fast_table = pq.read_table(directory / f"{fast}.parquet")
            sdk_table = pq.read_table(directory / f"{sdk}.parquet")
            for column in ("custom_id", "status", "output_text", "output_json", "input_tokens"):
                assert fast_table.column(column).equals(sdk_table.column(column)), column
        rss = _child_peak_rss(directory, path)
        worker = _child_peak_rss(directory, path, preload_airflow=True)
        assert rss["rows"] == worker["rows"] == N_LINES

    t = {name: seconds for name, (seconds, _) in best.items()}
    rows = [
        ("a", "fast: collect_lines -> Parquet, validating answers"),
        ("a0", "fast, without an output model"),
        ("b", "bare json.loads loop, nothing else"),
        ("c", "SDK objects -> rows -> Parquet, validating"),
        ("c0", "SDK objects -> rows -> Parquet, no model"),
    ]
    print(f"\n{'variant':<56} {'seconds':>8} {'lines/s':>10}")
    for key, name in rows:
        print(f"({key:<2}) {name:<51} {t[key]:>8.2f} {N_LINES / t[key]:>10,.0f}")
    peak = rss["peak_rss_mb"]
    # The targets apply to the pipeline's real case, answers validated against an output model
    # ((a) vs (b), (c)), and to the collect process as benchmarked (Airflow not imported).
    checks = [
        ("(c) / (a) speed-up [target]", t["c"] / t["a"], "x", ">= 7x", t["c"] / t["a"] >= 7),
        ("(a) / (b) time [target]", t["a"] / t["b"], "x", "<= 1.5x", t["a"] / t["b"] <= 1.5),
        ("(a) peak RSS [target]", peak, " MB", "< 200 MB", peak < 200),
        ("(c0) / (a0) speed-up [info]", t["c0"] / t["a0"], "x", ">= 7x", t["c0"] / t["a0"] >= 7),
        ("(a0) / (b) time [info]", t["a0"] / t["b"], "x", "<= 1.5x", t["a0"] / t["b"] <= 1.5),
    ]
    print(f"\n{'measure':<30} {'value':>10} {'target':>10}  result")
    for name, value, unit, target, ok in checks:
        print(f"{name:<30} {f'{value:.2f}{unit}':>10} {target:>10}  {'PASS' if ok else 'MISS'}")
    for label, r in (("collect process as benchmarked", rss), ("with Airflow imported (a worker)", worker)):
        print(
            f"{label}: imports {r['rss_imports_mb']:.0f} MB, + {N_LINES:,} keys"
            f" {r['rss_keys_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB"
            f" (collect's delta over imports {r['peak_rss_mb'] - r['rss_imports_mb']:.0f} MB;"
            f" airflow imported: {r['airflow_imported']})"
        )
    return {
        "lines": N_LINES,
        "input_mb": size_mb,
        "seconds": t,
        "rss": rss,
        "rss_with_airflow": worker,
        "all_targets_met": all(ok for name, *_, ok in checks if "[target]" in name),
    }


if __name__ == "__main__":
    main()
