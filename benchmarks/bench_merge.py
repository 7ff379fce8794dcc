"""Merge, dead letters and publish of a whole day, in bounded memory.

For each day size N (default 200,000 and 1,000,000 records, env ``BENCH_MERGE_SIZES``) a realistic
work dir is written to a temp dir, streamed chunk by chunk: ``keys.parquet``, attempt-1 results in
chunks of 100,000 rows of about 1 KB (answer text plus its JSON; 3 % overloaded, 1 % truncated,
1 % invalid), attempt-2 results for the 5 % that were retried, and a few prepare rejections. Then,
each in a fresh process (peak RSS = VmHWM of that process alone, imports included):

- floor:   pyarrow alone, streaming every attempt file's row groups into one Parquet file (the
           I/O any merge must do; what the issue calls "reading the input and writing the output");
- merge:   ``results.merge_attempts`` with the retry list and the dead letters (the resubmit
           step's work per round);
- publish: ``PublishPartitionOperator.execute`` (a new generation: data copy, dead letters,
           streamed summary, commit file). Airflow is imported, as on a worker.

Targets (issue 12): peak RSS of merge and publish < 500 MB at 1,000,000 records, and growing by
less than 64 MB from the smallest to the largest N (one chunk's working set does not depend on N);
merge CPU <= 3x the floor's. Run: ``python -m benchmarks bench_merge`` (the 1M case takes a few
minutes and ~3 GB of temp disk; ``BENCH_MERGE_SIZES=200000`` for a quick look).
"""

from __future__ import annotations

import json
import os
import resource
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

SIZES = [int(s) for s in os.environ.get("BENCH_MERGE_SIZES", "200000,1000000").split(",") if s.strip()]
CHUNK = 100_000
TEXT_BYTES = 500  # output_text, and the same text again as output_json: ~1 KB a row
KEY_COLUMNS = ["ticket_id"]
MODEL = "claude-haiku-4-5"
RSS_LIMIT_MB = 500
RSS_GROWTH_MB = 64
CPU_RATIO = 3.0


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- the work dir -------------------------------------------------------------------------------------


def generate(work: Path, n: int) -> dict:
    """Write a day of ``n`` records (see module docstring); returns paths and counts."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anthropic_batch.results import dead_letter_schema, result_schema

    rng = np.random.default_rng(n)
    schema = result_schema(KEY_COLUMNS)
    (work / "requests").mkdir(parents=True)
    attempt1, attempt2 = work / "results" / "attempt-01", work / "results" / "attempt-02"
    attempt1.mkdir(parents=True)
    attempt2.mkdir(parents=True)
    keys_writer = pq.ParquetWriter(
        work / "requests" / "keys.parquet",
        pa.schema([("custom_id", pa.string()), ("ticket_id", pa.string()),
                   ("request_fingerprint", pa.string()), ("chunk_index", pa.int32())]),
    )  # fmt: skip
    retried_ids: list[pa.Array] = []
    chunks = []
    for index, start in enumerate(range(0, n, CHUNK)):
        size = min(CHUNK, n - start)
        ids = pa.array([f"T-{i:08d}" for i in range(start, start + size)], pa.string())
        fingerprints = pa.array([f"{i:064x}" for i in range(start, start + size)], pa.string())
        keys_writer.write_table(
            pa.table({"custom_id": ids, "ticket_id": ids, "request_fingerprint": fingerprints,
                      "chunk_index": pa.array(np.full(size, index, np.int32))})
        )  # fmt: skip
        draw = rng.random(size)
        overloaded, truncated, invalid = (
            draw < 0.03,
            (draw >= 0.03) & (draw < 0.04),
            (draw >= 0.04) & (draw < 0.05),
        )
        answered = ~overloaded
        text = pa.StringArray.from_buffers(
            size,
            pa.py_buffer(np.arange(0, (size + 1) * TEXT_BYTES, TEXT_BYTES, dtype=np.int32)),
            pa.py_buffer(rng.integers(97, 123, size * TEXT_BYTES, dtype=np.uint8).tobytes()),
        )
        status = np.where(overloaded, "errored", np.where(invalid, "invalid_output", "succeeded"))
        table = pa.table(
            {
                "custom_id": ids,
                "ticket_id": ids,
                "status": pa.array(status, pa.string()),
                "error_type": pa.array(
                    np.where(overloaded, "overloaded_error", np.where(invalid, "validation_error", None))
                ),
                "error_message": pa.array(np.where(overloaded, "Overloaded", None)),
                "output_text": pc_if(answered, text),
                "output_json": pc_if(answered & ~invalid & ~truncated, text),
                "stop_reason": pa.array(
                    np.where(overloaded, None, np.where(truncated, "max_tokens", "end_turn"))
                ),
                "model": pa.array(np.full(size, MODEL)),
                "input_tokens": pa.array(np.where(answered, 400, 0)),
                "output_tokens": pa.array(np.where(answered, 125, 0)),
                "cache_creation_input_tokens": pa.array(np.zeros(size, np.int64)),
                "cache_read_input_tokens": pa.array(np.where(answered, 300, 0)),
                "cost_usd": pa.array(np.where(answered, 0.0005, 0.0)),
                "sync_cost_usd": pa.array(np.where(answered, 0.001, 0.0)),
                "batch_id": pa.array(np.full(size, f"msgbatch_{index:04d}")),
                "attempt": pa.array(np.ones(size, np.int32)),
                "request_fingerprint": fingerprints,
            },
            schema=schema,
        )
        path = attempt1 / f"msgbatch_{index:04d}.parquet"
        pq.write_table(
            table,
            path,
            row_group_size=10_000,
            use_dictionary=["status", "error_type", "stop_reason", "model", "batch_id", "attempt"],
        )
        chunks.append({"index": index, "path": str(path), "n_requests": size})
        retry = overloaded | truncated | invalid
        retried = table.filter(pa.array(retry))
        retried_ids.append(retried.column("custom_id").combine_chunks())
        del table, text
    keys_writer.close()
    # Attempt 2: every retried request now succeeds.
    retried = pa.concat_arrays(retried_ids)
    m = len(retried)
    text = pa.StringArray.from_buffers(
        m,
        pa.py_buffer(np.arange(0, (m + 1) * TEXT_BYTES, TEXT_BYTES, dtype=np.int32)),
        pa.py_buffer(rng.integers(97, 123, m * TEXT_BYTES, dtype=np.uint8).tobytes()),
    )
    second = {name: pa.nulls(m, schema.field(name).type) for name in schema.names}
    second.update(
        custom_id=retried, ticket_id=retried, status=pa.array(["succeeded"] * m),
        output_text=text, output_json=text,
        stop_reason=pa.array(["end_turn"] * m), model=pa.array([MODEL] * m),
        input_tokens=pa.array(np.full(m, 400)), output_tokens=pa.array(np.full(m, 250)),
        cost_usd=pa.array(np.full(m, 0.0007)), sync_cost_usd=pa.array(np.full(m, 0.0014)),
        batch_id=pa.array(["msgbatch_retry"] * m), attempt=pa.array(np.full(m, 2, np.int32)),
    )  # fmt: skip
    pq.write_table(
        pa.table(second, schema=schema), attempt2 / "msgbatch_retry.parquet", row_group_size=10_000
    )
    rejected = pa.Table.from_pylist(
        [{"ticket_id": None, "stage": "prepare", "status": "rejected", "error_type": "null_key",
          "reason": "key is null", "attempts": 0, "record_json": "{}"}] * 10,
        schema=dead_letter_schema(KEY_COLUMNS),
    )  # fmt: skip
    pq.write_table(rejected, work / "rejected.parquet")
    manifest = {
        "chunks": chunks,
        "n_requests": n,
        "n_rejected": 10,
        "n_input_records": n + 10,
        "mode": "batch",
        "spec": {"pipeline": "bench", "partition": "2026-11-01", "model": MODEL, "key_columns": KEY_COLUMNS},
    }
    (work / "requests" / "manifest.json").write_text(json.dumps(manifest))
    paths = [c["path"] for c in chunks] + [str(attempt2 / "msgbatch_retry.parquet")]
    return {"paths": paths, "n_retried": m}


def pc_if(mask, values):
    """``values`` where ``mask``, else null (without copying the string buffers)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pa.array(mask), values, pa.scalar(None, pa.string()))


# -- the measured steps (each in a fresh process) --------------------------------------------------------


def _step_floor(work: Path, paths: list[str]) -> dict:
    import pyarrow.parquet as pq

    rows = 0
    writer = None
    for path in paths:
        parquet = pq.ParquetFile(path)
        if writer is None:
            writer = pq.ParquetWriter(work / "floor.parquet", parquet.schema_arrow)
        for batch in parquet.iter_batches(batch_size=10_000, use_threads=False):
            writer.write_batch(batch)
            rows += batch.num_rows
    if writer is not None:
        writer.close()
    return {"rows": rows}


def _step_merge(work: Path, paths: list[str]) -> dict:
    from anthropic_batch.results import merge_attempts

    stats = merge_attempts(
        paths,
        work / "results" / "merged.parquet",
        KEY_COLUMNS,
        expected_keys=work / "requests" / "keys.parquet",
        max_attempts=3,
        retry_truncated=True,
        retry_path=work / "results" / "retry.parquet",
        dead_letter_path=work / "dead_letter.parquet",
    )
    return {
        "rows": stats.n_rows,
        "buckets": stats.n_buckets,
        "retry": stats.n_retry,
        "dead": stats.n_dead_letters,
    }


def _step_publish(work: Path, paths: list[str]) -> dict:
    from types import SimpleNamespace

    from anthropic_batch.operators.publish import PublishPartitionOperator

    op = PublishPartitionOperator(
        task_id="publish",
        work_dir=f"file://{work}",
        merged_path=f"file://{work / 'results' / 'merged.parquet'}",
        extraction_dir=f"file://{work.parent / 'extractions' / 'date=2026-11-01'}",
    )
    summary = op.execute({"ti": SimpleNamespace(dag_id="bench", run_id="bench")})
    return {"rows": summary["n_rows"], "dead": summary["n_dead_letters"]}


STEPS = {"floor": _step_floor, "merge": _step_merge, "publish": _step_publish}


def _child(step: str, work: str, paths_json: str) -> None:
    if step == "publish":
        import airflow.sdk  # noqa: F401  (a worker has Airflow loaded; count it before the step)
    import pyarrow.parquet  # noqa: F401

    import anthropic_batch.results  # noqa: F401

    before = _rss_mb("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = STEPS[step](Path(work), json.loads(paths_json))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    print(
        json.dumps({**out, "wall_s": wall, "cpu_s": cpu, "rss_imports_mb": before, "peak_rss_mb": _rss_mb()})
    )


def _run_child(step: str, work: Path, paths: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_merge", "--child", step, str(work), json.dumps(paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    results: dict[int, dict[str, dict]] = {}
    for n in SIZES:
        with tempfile.TemporaryDirectory(prefix="bench_merge_", dir=os.environ.get("BENCH_MERGE_DIR")) as tmp:
            work = Path(tmp) / "work"
            t0 = time.perf_counter()
            day = generate(work, n)
            size_mb = sum(Path(p).stat().st_size for p in day["paths"]) / 1e6
            print(
                f"N={n:,}: generated {len(day['paths'])} attempt files ({size_mb:,.0f} MB, "
                f"{day['n_retried']:,} retried) in {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            results[n] = {
                step: _run_child(step, work, day["paths"]) for step in ("floor", "merge", "publish")
            }
            merged, published = results[n]["merge"], results[n]["publish"]
            assert merged["rows"] == published["rows"] == n, (merged, published)
            assert merged["retry"] == 0, merged  # attempt 2 answered every retried request
            assert published["dead"] == merged["dead"] + 10, (merged, published)

    header = f"{'wall s':>8} {'CPU s':>8} {'CPU/floor':>10} {'imports MB':>11} {'peak MB':>8}"
    print(f"\n{'N':>10} {'step':<8} {header}")
    for n, steps in results.items():
        floor_cpu = steps["floor"]["cpu_s"]
        for step, r in steps.items():
            print(
                f"{n:>10,} {step:<8} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['cpu_s'] / floor_cpu:>9.2f}x "
                f"{r['rss_imports_mb']:>11.0f} {r['peak_rss_mb']:>8.0f}"
            )
    small, large = min(results), max(results)
    checks = []
    for step in ("merge", "publish"):
        peak = results[large][step]["peak_rss_mb"]
        checks.append(
            (f"{step} peak RSS at {large:,}", f"{peak:.0f} MB", f"< {RSS_LIMIT_MB} MB", peak < RSS_LIMIT_MB)
        )
        if large != small:
            growth = peak - results[small][step]["peak_rss_mb"]
            checks.append(
                (f"{step} RSS growth {small:,} -> {large:,}", f"{growth:+.0f} MB", f"< {RSS_GROWTH_MB} MB",
                 growth < RSS_GROWTH_MB)
            )  # fmt: skip
    ratio = results[large]["merge"]["cpu_s"] / results[large]["floor"]["cpu_s"]
    checks.append(
        (f"merge CPU / floor at {large:,}", f"{ratio:.2f}x", f"<= {CPU_RATIO:g}x", ratio <= CPU_RATIO)
    )
    print(f"\n{'measure':<36} {'value':>10} {'target':>10}  result")
    for name, value, target, ok in checks:
        print(f"{name:<36} {value:>10} {target:>10}  {'PASS' if ok else 'MISS'}")
    return {"results": results, "all_targets_met": all(ok for *_, ok in checks)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:5])
    else:
        main()
