"""`make airflow`: a real ``airflow standalone`` on this project, talking to the emulator.

Starts the Message Batches emulator (unless ``ANTHROPIC_API_KEY`` is set: then the real API),
writes demo tickets for the last 7 days, starts Airflow (scheduler, dag-processor, triggerer,
api-server) with this checkout's dags and plugins, creates the batch pools (one per pipeline), and prints
the UI URL and the admin login. Runs in the foreground until Ctrl-C, then stops everything.

    python include/demo/run_airflow.py --port 8080
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import threading
from pathlib import Path

CHECKOUT_DIR = Path(__file__).resolve().parents[2]
for _path in (CHECKOUT_DIR / "plugins", CHECKOUT_DIR / "include", CHECKOUT_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--days", type=int, default=7, help="days of demo data before today (and today)")
    parser.add_argument("--per-day", type=int, default=30)
    parser.add_argument(
        "--processing-seconds", default="20", help="emulator: seconds a batch stays in progress"
    )
    args = parser.parse_args(argv)

    from batches_emulator.testing import EmulatorProcess
    from demo.generate_data import write_code_files, write_tickets
    from demo.standalone import StandaloneAirflow

    airflow_home = Path(os.environ.get("AIRFLOW_HOME") or CHECKOUT_DIR / ".airflow")
    root = os.environ.get("ANTHROPIC_BATCH_STORAGE_ROOT") or f"file://{CHECKOUT_DIR / 'data'}"
    today = dt.datetime.now(dt.UTC).date()
    yesterday = today - dt.timedelta(days=1)
    first = today - dt.timedelta(days=args.days)
    # An unpaused DAG starts with the scheduled run of yesterday (the day that has ended); today's
    # data is there for a manual run with today's logical date.
    for offset in range(args.days + 1):
        day = today - dt.timedelta(days=offset)
        write_tickets(root, day, per_day=args.per_day)
        write_code_files(root, day)
    print(f"Demo data for {first} .. {today} under {root}/sources")

    emulator = None
    real_key = os.environ.get("ANTHROPIC_API_KEY")
    if real_key:
        conn = {"conn_type": "anthropic", "password": real_key}
        print("Using the real Anthropic API (ANTHROPIC_API_KEY is set).")
    else:
        emulator = EmulatorProcess(
            "--processing-seconds",
            args.processing_seconds,
            "--seed",
            "7",
            "--error-rate",
            "overloaded_error=0.03",
            "--invalid-output-rate",
            "0.03",
            db_path=airflow_home / "emulator" / "emulator.sqlite",
        ).start()
        conn = {"conn_type": "anthropic", "password": emulator.api_key, "host": emulator.base_url}
        print(f"Message Batches emulator at {emulator.base_url}")
    env = {
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(conn),
        "ANTHROPIC_BATCH_STORAGE_ROOT": root,
    }
    if emulator is not None:
        env["ANTHROPIC_BATCH_POLL_INTERVAL"] = "5"

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    airflow = StandaloneAirflow(airflow_home, port=args.port, env=env)
    try:
        print(f"Starting airflow standalone (AIRFLOW_HOME={airflow_home}, log {airflow.log_path}) ...")
        airflow.start()
        from anthropic_batch.dag_factory import ensure_pool_commands
        from anthropic_batch.pipeline_config import load_pipelines

        for command in ensure_pool_commands(load_pipelines()):
            airflow.airflow_cli(*command)
        print(f"\nAirflow UI: {airflow.base_url}")
        print(f"Login: {airflow.username} / {airflow.password}")
        print(f"Backfill the demo week (with AIRFLOW_HOME={airflow_home}):")
        print(f"  airflow backfill create --dag-id bulk_extraction --from-date {first} --to-date {yesterday}")
        print("Ctrl-C stops everything.")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("\nStopping Airflow ...")
        airflow.stop()
        if emulator is not None:
            emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
