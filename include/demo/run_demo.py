"""`make demo`: bulk_extraction then overnight_report, end to end, in one process.

Without ``ANTHROPIC_API_KEY`` the Message Batches API emulator is started (a few seconds of batch
processing and, unless ``--no-faults``, small rates of every retriable per-request failure, so the
resubmit rounds show); with it, the real API is used. The key only
ever travels in the ``anthropic_default`` connection (env ``AIRFLOW_CONN_ANTHROPIC_DEFAULT``); it is
never printed.

Steps: migrate the project-local ``AIRFLOW_HOME`` (``.airflow/``), create the batch pool, generate a
day of messy support tickets, run ``bulk_extraction`` for that date with ``dag.test()``, then
``overnight_report`` for the same date; check both DagRuns succeeded and print where the results
and the report are, the counts by status, the resubmit rounds (what was retried, and why), the
cost, and what the same work would have cost synchronously.

    python include/demo/run_demo.py [--date 2026-11-01] [--per-day 40] [--mode batch] [--no-faults]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

CHECKOUT_DIR = Path(__file__).resolve().parents[2]
for _path in (CHECKOUT_DIR / "plugins", CHECKOUT_DIR / "include", CHECKOUT_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

if TYPE_CHECKING:
    from anthropic_batch.contracts import RunSummary

#: Emulator settings for the demo: quick batches.
EMULATOR_FLAGS = ("--processing-seconds", "3", "--seed", "7")
#: Default (``--no-faults`` turns it off): a little of every retriable per-request failure the
#: emulator can inject quickly, so the resubmit rounds show. (Expired requests are left out: the
#: emulator can only expire a batch by fast-forwarding its clock, which would skew every timestamp.)
#: Output faults are kept rarer than errors: they also reach the sample gate's synchronous calls
#: (twenty requests, 60% must pass), which the demo's faults are not meant to trip.
FAULT_FLAGS = (
    "--error-rate", "overloaded_error=0.05",
    "--error-rate", "api_error=0.03",
    "--error-rate", "rate_limit_error=0.02",
    "--invalid-output-rate", "0.02",
    "--truncate-rate", "0.02",
)  # fmt: skip


#: The DAGs the demo runs.
DEMO_DAG_IDS = ("bulk_extraction", "overnight_report")


def configure_environment(storage_root: str | None = None) -> dict[str, str]:
    """Airflow settings for this checkout; must run before ``airflow`` is imported."""
    env = {
        "AIRFLOW_HOME": os.environ.get("AIRFLOW_HOME") or str(CHECKOUT_DIR / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(CHECKOUT_DIR / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(CHECKOUT_DIR / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "ANTHROPIC_BATCH_STORAGE_ROOT": storage_root
        or os.environ.get("ANTHROPIC_BATCH_STORAGE_ROOT")
        or f"file://{CHECKOUT_DIR / 'data'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    os.environ.update(env)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    return env


def airflow_cli(*args: str) -> None:
    """``airflow <args>`` in a subprocess with this environment; fail with its output on error."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), *args], capture_output=True, text=True, env=os.environ
    )
    if proc.returncode != 0:
        raise SystemExit(f"`airflow {' '.join(args)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def prepare_airflow() -> None:
    """Migrate the metadata DB and create the batch pools, one per pipeline (both idempotent)."""
    from anthropic_batch.dag_factory import ensure_pool_commands
    from anthropic_batch.pipeline_config import load_pipelines

    airflow_cli("db", "migrate")
    for command in ensure_pool_commands(load_pipelines()):
        airflow_cli(*command)


def use_connection(base_url: str | None, api_key: str) -> None:
    conn: dict[str, str] = {"conn_type": "anthropic", "password": api_key}
    if base_url:
        conn["host"] = base_url
    os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(conn)


def forget_emulator_submissions(root: str, date: str) -> None:
    """Drop the date's ledger entries when the demo's emulator starts with a new database.

    The emulator keeps its batches in ``.airflow/demo-emulator.sqlite`` so that a re-run of the
    demo re-attaches to them through the ledger, as with the real API. When that database is new,
    ledger entries left by an earlier demo point at batches no emulator knows (nothing was paid
    for them); without this, the run would wait for them in vain.
    """
    from anthropic_batch import storage

    for dag_id in DEMO_DAG_IDS:
        directory = storage.ledger_root(root) / dag_id / date
        if directory.exists():
            print(f"New emulator database: forgetting the emulated submissions in {directory}")
            directory.rmdir(recursive=True)


def load_dags() -> dict[str, object]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(CHECKOUT_DIR / "dags"))
    if bag.import_errors:
        raise SystemExit(
            "DAG import errors:\n" + "\n".join(f"{k}: {v}" for k, v in bag.import_errors.items())
        )
    return bag.dags


def run_dag(dag, logical_date: dt.datetime, conf: dict) -> str:
    started = time.monotonic()
    print(f"\n== {dag.dag_id} for {logical_date:%Y-%m-%d} {conf} ...", flush=True)
    run = dag.test(logical_date=logical_date, run_conf=conf)
    state = str(getattr(run.state, "value", run.state))
    print(f"== {dag.dag_id}: {state} in {time.monotonic() - started:.0f}s", flush=True)
    return state


def print_results(root: str, date: str) -> None:
    from anthropic_batch import partition, storage
    from anthropic_batch.contracts import RunSummary

    # Through the partition's commit file, as every reader must (see anthropic_batch/partition.py).
    published = partition.published_files(storage.extraction_dir(root, "bulk_extraction", date))
    summary = published.read_summary() if published is not None else RunSummary()
    report_dir = storage.report_dir(root, date)
    print("\nResults")
    if published is None:
        print("  extraction : (nothing published)")
    else:
        print(f"  extraction : {published.data_path} ({summary.n_rows} rows)")
    print(f"  dead letter: {summary.dead_letter_path or '(none)'} ({summary.n_dead_letters} records)")
    print(f"  report     : {report_dir}/report.html (and report.md)")
    print(f"  input records {summary.n_input_records}, by status: {summary.counts_by_status}")
    print(f"  batches {len(summary.batch_ids)}, attempts {summary.attempts}")
    print_resubmit_rounds(root, date, summary)
    print(
        f"  cost ${summary.cost_usd or 0:.4f} with batches; "
        f"synchronously ${summary.sync_cost_usd or 0:.4f} "
        f"(saved ${summary.savings_usd or 0:.4f}; prices as of {summary.price_table_as_of})"
    )
    print_cost_check(root, date)


def projection_vs_actual(root: str, date: str) -> dict:
    """The sample gate's projection of the batch cost beside what the batches cost, and each first-
    attempt batch's prompt-cache tokens (issue 13). The actual cost is the run summary's
    ``cost_breakdown`` (every attempt's batch results; the sample's own synchronous cost apart)."""
    from anthropic_batch import layout, partition, storage
    from anthropic_batch.pricing import CostBreakdown

    work = storage.work_dir(root, "bulk_extraction", date)
    report = storage.read_json(layout.sample_report_path(work)) or {}
    published = partition.published_files(storage.extraction_dir(root, "bulk_extraction", date))
    summary = published.read_summary() if published is not None else None
    breakdown = (summary.cost_breakdown if summary is not None else None) or CostBreakdown()
    actual = breakdown.total_usd
    projection = report.get("projection") or {}
    projected = float(report.get("projected_batch_cost_usd") or 0)
    batches = []
    attempt_dir = layout.attempt_dir(work, 1)
    if attempt_dir.exists():
        for path in sorted(attempt_dir.iterdir(), key=lambda p: p.name):
            if not path.name.endswith(".parquet"):
                continue
            rows = storage.read_parquet(
                str(path), columns=["cache_creation_input_tokens", "cache_read_input_tokens"]
            ).to_pylist()
            batches.append(
                {
                    "batch": path.name.removesuffix(".parquet"),
                    "requests": len(rows),
                    "cache_writes": sum(r["cache_creation_input_tokens"] or 0 for r in rows),
                    "cache_reads": sum(r["cache_read_input_tokens"] or 0 for r in rows),
                }
            )
    return {
        "n_sampled": report.get("n_sampled"),
        "projected_usd": projected,
        "projected_without_caching_usd": float(
            (projection.get("without_caching") or {}).get("batch_usd") or 0
        ),
        "actual_usd": actual,
        "error_pct": (projected - actual) / actual * 100 if actual else None,
        "cache_warning": report.get("cache_warning"),
        "breakdown": breakdown.model_dump(),
        "batches": batches,
    }


def print_cost_check(root: str, date: str) -> None:
    check = projection_vs_actual(root, date)
    if check["n_sampled"] is None or not check["actual_usd"]:
        return
    b = check["breakdown"]
    print(
        f"  projected from the {check['n_sampled']}-request sample: ${check['projected_usd']:.4f} "
        f"with caching (${check['projected_without_caching_usd']:.4f} without); "
        f"the batches cost ${check['actual_usd']:.4f} "
        f"({check['error_pct']:+.1f} %)"
    )
    print(
        f"  cache: {b.get('cache_write_tokens', 0):,} tokens written (${b.get('cache_write_usd', 0):.4f}), "
        f"{b.get('cache_read_tokens', 0):,} read (${b.get('cache_read_usd', 0):.4f}); saved "
        f"${b.get('cache_saving_usd', 0):.4f} by caching and ${b.get('batch_saving_usd', 0):.4f} by batching"
    )
    for i, batch in enumerate(check["batches"], start=1):
        print(
            f"    chunk batch {i} ({batch['batch']}): {batch['requests']} requests, cache writes "
            f"{batch['cache_writes']:,} tokens, cache reads {batch['cache_reads']:,} tokens"
        )
    if check["cache_warning"]:
        print(f"  WARNING prompt caching: {check['cache_warning']}")


def print_resubmit_rounds(root: str, date: str, summary: RunSummary) -> None:
    """The resubmit rounds of the run: how many requests each retried and why (``merged.json``)."""
    from anthropic_batch import layout, storage

    merged_path = layout.merged_path(layout.work_dir(root, "bulk_extraction", date))
    rounds = (storage.read_json(layout.merge_record_path(merged_path)) or {}).get("rounds") or []
    if not rounds:
        print("  resubmit rounds: none (nothing retriable failed)")
        return
    print(f"  resubmit rounds ({len(rounds)}; attempt 1 is the first submission):")
    for r in rounds:
        reasons = ", ".join(f"{n} {why}" for why, n in r.get("reasons", {}).items())
        print(
            f"    attempt {r['attempt']}: {r['n_requests']} request(s) resubmitted ({reasons}) "
            f"in {len(r.get('batch_ids') or [])} batch(es)"
        )
    data_path = summary.data_path
    if data_path:
        rows = storage.read_parquet(data_path, columns=["status", "attempt"]).to_pylist()
        recovered = sum(1 for row in rows if row["status"] == "succeeded" and (row["attempt"] or 1) > 1)
        collect_dead = summary.n_dead_letters_by_stage.get("collect", 0)
        print(
            f"    -> {recovered} request(s) recovered by a resubmit; {collect_dead} dead-lettered after "
            "collect (permanent errors, or out of attempts)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bulk_extraction + overnight_report, end to end")
    parser.add_argument(
        "--date", type=dt.date.fromisoformat, default=dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    )
    parser.add_argument("--per-day", type=int, default=40)
    parser.add_argument("--mode", choices=["batch", "sync", "auto"], default="batch")
    parser.add_argument("--verbose", action="store_true", help="show Airflow's task logs")
    parser.add_argument("--storage-root", default=None)
    parser.add_argument(
        "--faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="emulator only: inject a few retriable failures so resubmit rounds show (default: on)",
    )
    args = parser.parse_args(argv)

    if not args.verbose:
        os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    env = configure_environment(args.storage_root)
    root = env["ANTHROPIC_BATCH_STORAGE_ROOT"]
    started = time.monotonic()

    from batches_emulator.testing import EmulatorProcess
    from demo.generate_data import write_tickets

    real_key = os.environ.get("ANTHROPIC_API_KEY")
    emulator = None
    if real_key:
        print("Using the real Anthropic API (ANTHROPIC_API_KEY is set); batches may take a while.")
        use_connection(None, real_key)
    else:
        db_path = Path(env["AIRFLOW_HOME"]) / "demo-emulator.sqlite"
        if not db_path.exists():
            forget_emulator_submissions(root, args.date.isoformat())
        emulator = EmulatorProcess(
            *EMULATOR_FLAGS, *(FAULT_FLAGS if args.faults else ()), db_path=db_path
        ).start()
        print(f"ANTHROPIC_API_KEY not set: using the Message Batches emulator at {emulator.base_url}")
        if args.faults:
            print(
                "Emulator faults on (--no-faults to turn off): a few overloaded/api/rate-limit errors, "
                "invalid JSON answers and max_tokens truncations, which the resubmit step retries."
            )
        use_connection(emulator.base_url, emulator.api_key)
        os.environ.setdefault("ANTHROPIC_BATCH_POLL_INTERVAL", "1")
    try:
        prepare_airflow()
        tickets = write_tickets(root, args.date, per_day=args.per_day)
        print(f"Generated {args.per_day}+ tickets for {args.date}: {tickets}")
        dags = load_dags()
        logical = dt.datetime.combine(args.date, dt.time(), tzinfo=dt.UTC)
        states = {
            "bulk_extraction": run_dag(dags["bulk_extraction"], logical, {"mode": args.mode}),
        }
        if states["bulk_extraction"] == "success":
            states["overnight_report"] = run_dag(
                dags["overnight_report"],
                logical + dt.timedelta(hours=6, minutes=30),
                {"date": args.date.isoformat(), "mode": args.mode},
            )
        print_results(root, args.date.isoformat())
    finally:
        if emulator is not None:
            emulator.close()
    print(f"\nDone in {time.monotonic() - started:.0f}s: {states}")
    return 0 if all(s == "success" for s in states.values()) and len(states) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
