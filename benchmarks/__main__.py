"""Run every benchmark module in this package (`make bench`), or the ones named.

``python -m benchmarks [bench_x ...] [--option ...]``: names select modules; any other arguments
are left in ``sys.argv`` for the selected modules' own parsers (e.g. ``bench_pipeline --records N``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    wanted = [a for a in sys.argv[1:] if a in names]
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in names]
    selected = [n for n in names if not wanted or n in wanted]
    for name in selected:
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
