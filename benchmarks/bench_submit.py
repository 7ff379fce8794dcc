"""Streamed batch create vs the SDK's list-based create: peak memory and wall time, side by side.

One chunk of 100,000 requests is written with ``batch_requests.write_chunk``; each variant then
runs in a fresh subprocess (so peak RSS is its own) against the same emulator:

- streamed: ``AnthropicBatchHook.create_batch_from_chunk(chunk)`` (the body is streamed from the file);
- sdk:      ``client.messages.batches.create(requests=[json.loads(line) for line in chunk])``.

Both children import the same modules before measuring, so the baseline RSS is comparable.
Targets: streamed peak RSS < 300 MB and >= 2x faster end to end (load + send + server answer).
Run: ``python -m benchmarks bench_submit`` (env BENCH_SUBMIT_REQUESTS to change the size).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "plugins", REPO / "include", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

N_REQUESTS = int(os.environ.get("BENCH_SUBMIT_REQUESTS", "100000"))
ROUNDS = int(os.environ.get("BENCH_SUBMIT_ROUNDS", "2"))
PROMPT = (
    "Extract the company name, the invoice total and the due date from the following text. "
    "Answer in JSON. Text: ACME Corp. invoice no. {i}, total due 1,234.56 EUR by 2026-12-{d:02d}. "
    "Thank you for your business; late payments incur a fee of 2% per month. "
) * 2


def _request_line(i: int) -> bytes:
    params = {
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "system": "You extract fields from invoices.",
        "messages": [{"role": "user", "content": PROMPT.format(i=i, d=i % 28 + 1)}],
    }
    return json.dumps({"custom_id": f"inv-{i:07d}", "params": params}, separators=(",", ":")).encode()


def _rss_mb() -> float:
    """Peak RSS of this process so far, in MB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child of a
    parent that already grew (``make bench`` runs bench_collect first) would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(variant: str, chunk: str, base_url: str, api_key: str) -> None:
    """Run one create in this (fresh) process and print its measurements as JSON."""
    import anthropic

    from anthropic_batch.batch_requests import iter_chunk_lines
    from anthropic_batch.hooks import AnthropicBatchHook

    os.environ["AIRFLOW_CONN_BENCH"] = json.dumps(
        {"conn_type": "anthropic", "password": api_key, "host": base_url}
    )
    hook = AnthropicBatchHook("bench")
    client = hook.conn  # built before measuring, in both variants
    baseline = _rss_mb()
    started = time.perf_counter()
    if variant == "streamed":
        batch = hook.create_batch_from_chunk(chunk)
    else:
        requests = [json.loads(line) for line in iter_chunk_lines(chunk)]
        loaded = time.perf_counter()
        batch = client.with_options(max_retries=0, timeout=600).messages.batches.create(requests=requests)
    wall = time.perf_counter() - started
    result = {
        "variant": variant,
        "wall_s": wall,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _rss_mb(),
        "n_requests": batch.request_counts.processing,
    }
    if variant == "sdk":
        result["load_s"] = loaded - started
    assert isinstance(batch, anthropic.types.messages.MessageBatch)
    print(json.dumps(result))


def _run_child(variant: str, chunk: str, base_url: str, api_key: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("plugins", "include", "."))}
    env.setdefault("AIRFLOW_HOME", str(REPO / ".airflow" / "bench"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_submit", "--child", variant, chunk, base_url, api_key],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from anthropic_batch.batch_requests import write_chunk
    from batches_emulator.testing import EmulatorProcess

    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        chunk_path = Path(tmp) / "requests" / "chunk-00000.jsonl"
        chunk_path.parent.mkdir(parents=True)
        info = write_chunk((_request_line(i) for i in range(N_REQUESTS)), str(chunk_path), 0)
        print(f"chunk: {info['n_requests']} requests, {info['n_bytes'] / 2**20:.1f} MiB")
        flags = ("--processing-seconds", "3600", "--max-body-bytes", str(1 << 30))
        with EmulatorProcess(*flags) as emu:
            runs: dict[str, list[dict]] = {"streamed": [], "sdk": []}
            for _ in range(ROUNDS):
                for variant in ("streamed", "sdk"):
                    r = _run_child(variant, info["path"], emu.base_url, emu.api_key)
                    assert r["n_requests"] == N_REQUESTS
                    runs[variant].append(r)
                    print(
                        f"  {variant:8s} wall {r['wall_s']:6.2f}s  peak RSS {r['peak_rss_mb']:7.1f} MB "
                        f"(baseline {r['baseline_rss_mb']:.1f} MB)"
                        + (f"  [json.loads of the file: {r['load_s']:.2f}s]" if "load_s" in r else "")
                    )
        best = {v: min(rs, key=lambda r: r["wall_s"]) for v, rs in runs.items()}
        peak = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items()}
        speedup = best["sdk"]["wall_s"] / best["streamed"]["wall_s"]
        print(
            f"streamed: best {best['streamed']['wall_s']:.2f}s, peak RSS {peak['streamed']:.1f} MB | "
            f"sdk: best {best['sdk']['wall_s']:.2f}s, peak RSS {peak['sdk']:.1f} MB"
        )
        print(f"speed-up streamed vs sdk: {speedup:.2f}x (target >= 2x)")
        print(
            f"memory ratio sdk/streamed: {peak['sdk'] / peak['streamed']:.2f}x "
            f"(target: streamed < 300 MB -> {'met' if peak['streamed'] < 300 else 'NOT met'})"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
    else:
        main()
