"""prepare's duplicate-key check at 10,000,000 keys, in a fresh process, against the 500 MB bound.

The child builds the key column with Arrow alone (no Python string per key), then runs
``duplicate_keys.duplicate_counts`` exactly as ``prepare_requests`` calls it; 1 % of the keys are
duplicated so the exact confirmation step has real work. Peak RSS is VmHWM of the child (the key
table itself included). Run: ``python -m benchmarks bench_duplicate_keys`` (env BENCH_DUP_KEYS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_KEYS = int(os.environ.get("BENCH_DUP_KEYS", "10000000"))
TARGET_MB = 500.0

CHILD = """
import json, sys, time
sys.path[:0] = [{plugins!r}, {repo!r}]
import numpy as np, pyarrow as pa, pyarrow.compute as pc
from benchmarks.bench_collect import peak_rss_mb
from anthropic_batch.batch_requests import _key_str, make_custom_id
from anthropic_batch.duplicate_keys import duplicate_counts

n = {n}
parts = []
for off in range(0, n, 1_000_000):  # built a slice at a time so that building is not the peak
    ids = np.arange(off, min(n, off + 1_000_000), dtype=np.int64)
    ids[::100] = ids[1::100][: len(ids[::100])]  # every 100th record repeats its neighbour's key
    parts.append(pc.binary_join_element_wise("T", pc.cast(pa.array(ids), pa.string()), ""))
table = pa.table({{"ticket_id": pa.chunked_array(parts)}})
del parts, ids
base = peak_rss_mb()
t0, c0 = time.perf_counter(), time.process_time()
counts = duplicate_counts(table, ["ticket_id"], make_custom_id, _key_str)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
n_dup = int((counts.key_counts > 1).sum())  # candidates only: the rest are unique
print(json.dumps({{"wall": wall, "cpu": cpu, "peak_mb": peak_rss_mb(), "table_peak_mb": base,
                   "n_duplicates": n_dup, "table_mb": table.nbytes / 2**20}}))
"""


def run_child(n: int) -> dict:
    code = CHILD.format(plugins=str(REPO / "plugins"), repo=str(REPO), n=n)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    t0 = time.perf_counter()
    r = run_child(N_KEYS)
    expected = 2 * len(range(0, N_KEYS, 100))  # every 100th key appears twice (slices of 1M)
    print(
        f"{N_KEYS:,} keys ({r['table_mb']:.0f} MB of Arrow key column): duplicate check "
        f"{r['wall']:.1f}s wall, {r['cpu']:.1f}s CPU; {r['n_duplicates']:,} duplicate records found "
        f"(expected {expected:,}); total {time.perf_counter() - t0:.0f}s"
    )
    ok = r["peak_mb"] < TARGET_MB and r["n_duplicates"] == expected
    print(
        f"peak RSS {r['peak_mb']:.0f} MB (after building the keys: {r['table_peak_mb']:.0f} MB), "
        f"target < {TARGET_MB:.0f} MB  {'PASS' if ok else 'MISS'}"
    )
    return {**r, "ok": ok}


if __name__ == "__main__":
    main()
