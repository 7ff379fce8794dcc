"""A day of N records through the real operators on the emulator, one fresh process per task.

``python -m benchmarks bench_pipeline --records N`` (default 100,000; env BENCH_PIPELINE_RECORDS)
writes N support tickets (Parquet, ~450 bytes a record), starts the emulator with 5 % retriable
failures (``--error-rate overloaded_error=0.03 --error-rate api_error=0.02``) and runs, each task in
its own fresh interpreter as an Airflow worker would: prepare (100,000 requests a chunk), then per
chunk submit, wait (deferrable: the trigger runs in this parent, as the triggerer would, and the
task resumes in a new process), collect; then resubmit (its own deferrals likewise) and publish.
Sample-refine is left out (it sends a fixed-size sample, whatever N is).

Per task: wall time, CPU time (user + system of its processes), peak RSS (VmHWM; the largest of
a mapped task's processes). Beside them, measured in the same run, a floor: a fresh process that
reads the input Parquet and writes the same output Parquet (the published ``data.parquet``,
streamed row group by row group) with pyarrow alone; and a second, ``floor2``, that adds the
per-record work no implementation can skip: render each prompt, JSON-encode its request and decode
a line back (``pipeline_floors``), printed for information beside the issue's PASS/MISS.

Targets: every task's peak RSS < 500 MB (at 1,000,000 records), and total CPU of our tasks at most
3x the floor. Run it at 100,000 and 1,000,000 and compare the peaks: a task whose peak grows with N
(beyond one chunk's working set) holds the day in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.pipeline_floors import per_record_floor, pyarrow_floor

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "plugins", REPO / "include", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow" / "bench"))

PER_CHUNK = 100_000
RSS_TARGET_MB = 500.0
CPU_RATIO_TARGET = 3.0
PARTITION = "2026-11-01"
DAG_ID = PIPELINE = "bench_pipeline"
RUN_ID = f"manual__{PARTITION}T00:00:00+00:00"
MODEL = "claude-haiku-4-5"
EMULATOR_FLAGS = (
    "--processing-seconds",
    "1",
    "--error-rate",
    "overloaded_error=0.03",
    "--error-rate",
    "api_error=0.02",
)
WORDS = " ".join(
    (
        "invoice payment overdue customer account refund shipping delayed damaged package support",
        "request escalation priority billing address update subscription cancel renewal discount",
        "router firmware login password reset outage crash error screen battery charger warranty",
    )
).split()


# -- input -------------------------------------------------------------------------------------------
def write_input(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(12)
    schema = pa.schema(
        [(c, pa.string()) for c in ("ticket_id", "channel", "customer_tier", "subject", "body")]
    )
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, n, 50_000):
            rows = range(start, min(n, start + 50_000))
            writer.write_table(
                pa.table(
                    {
                        "ticket_id": [f"T{i:08d}" for i in rows],
                        "channel": [rng.choice(("email", "chat", "phone")) for _ in rows],
                        "customer_tier": [rng.choice(("free", "pro", "enterprise")) for _ in rows],
                        "subject": [" ".join(rng.choices(WORDS, k=5)) for _ in rows],
                        "body": [" ".join(rng.choices(WORDS, k=45)) for _ in rows],
                    },
                    schema=schema,
                )
            )


# -- the child: one task (or one resumption of it) in a fresh interpreter ----------------------------
def _context(task_id: str, map_index: int) -> dict[str, Any]:
    from tests.plugins.anthropic_batch._operator_context import make_context

    return make_context(
        task_id=task_id, map_index=map_index, dag_id=DAG_ID, run_id=RUN_ID, partition=PARTITION
    )


def _operator(task: str, args: dict[str, Any]):
    if task == "prepare":
        from anthropic_batch.operators.prepare import PrepareRequestsOperator

        return PrepareRequestsOperator(
            task_id="prepare",
            key_columns=["ticket_id"],
            prompt_template="prompts/support_ticket.j2",
            model=MODEL,
            max_tokens=512,
            output_model="schemas/support_ticket.py:SupportTicketExtraction",
            include_dir=str(REPO / "include"),
            pipeline=PIPELINE,
            partition=PARTITION,
            max_requests_per_chunk=PER_CHUNK,
            **args,
        )
    if task == "submit":
        from anthropic_batch.operators.submit import SubmitBatchOperator

        return SubmitBatchOperator(task_id="submit", **args)
    if task == "wait":
        from anthropic_batch.sensors import AnthropicBatchSensor

        return AnthropicBatchSensor(task_id="wait", poll_interval=1, max_poll_interval=2, **args)
    if task == "collect":
        from anthropic_batch.operators.collect import CollectResultsOperator

        return CollectResultsOperator(task_id="collect", **args)
    if task == "resubmit":
        from anthropic_batch.operators.resubmit import ResubmitFailuresOperator

        return ResubmitFailuresOperator(task_id="resubmit", poll_interval=1, max_poll_interval=2, **args)
    if task == "publish":
        from anthropic_batch.operators.publish import PublishPartitionOperator

        return PublishPartitionOperator(task_id="publish", pipeline=PIPELINE, **args)
    raise ValueError(task)


def child(spec: dict[str, Any]) -> None:
    from benchmarks.bench_collect import peak_rss_mb

    t0 = time.perf_counter()
    out: dict[str, Any] = {"deferred": None}
    if spec["task"] == "floor":
        out["result"] = pyarrow_floor(spec["args"])
    elif spec["task"] == "floor_per_record":
        out["result"] = per_record_floor(spec["args"])
    elif spec["task"] == "startup":
        # What every task process pays before its work: the interpreter, Airflow and our modules.
        import anthropic_batch.operators.collect
        import anthropic_batch.operators.prepare
        import anthropic_batch.operators.publish
        import anthropic_batch.operators.resubmit
        import anthropic_batch.operators.submit
        import anthropic_batch.sensors  # noqa: F401

        out["result"] = None
    else:
        from airflow.sdk.exceptions import TaskDeferred

        operator = _operator(spec["task"], spec["args"])
        context = _context(spec["task_id"], spec.get("map_index", -1))
        profile_dir = os.environ.get("BENCH_PROFILE")
        profiler = None
        if profile_dir:  # BENCH_PROFILE=dir: one cProfile file per task process (pstats to read)
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            resume = spec.get("resume")
            if resume:
                out["result"] = getattr(operator, resume["method"])(context, event=resume["event"])
            else:
                out["result"] = operator.execute(context)
        except TaskDeferred as deferred:
            classpath, kwargs = deferred.trigger.serialize()
            out["deferred"] = {"classpath": classpath, "kwargs": kwargs, "method": deferred.method_name}
        finally:
            if profiler is not None:
                profiler.disable()
                step = "resume" if spec.get("resume") else "execute"
                name = f"{spec['task']}-{spec.get('map_index', -1)}-{step}-{os.getpid()}.prof"
                profiler.dump_stats(str(Path(profile_dir) / name))
    out["wall"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_mb()
    print("BENCH-RESULT " + json.dumps(out, default=str), flush=True)


# -- the parent -----------------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def add(self, name: str, wall: float, cpu: float, peak: float) -> None:
        row = self.rows.setdefault(name, {"wall": 0.0, "cpu": 0.0, "peak_mb": 0.0, "processes": 0})
        row["wall"] += wall
        row["cpu"] += cpu
        row["peak_mb"] = max(row["peak_mb"], peak)
        row["processes"] += 1


def _run_child(spec: dict[str, Any], env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """Run one child; returns its result, wall time and CPU time (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    code = (
        f"import sys; sys.path[:0] = [{str(REPO)!r}]\n"
        f"from benchmarks.bench_pipeline import child\nchild({spec!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{spec['task']} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(lines[-1].removeprefix("BENCH-RESULT ")), wall, cpu


def _trigger_event(deferred: dict[str, Any]) -> dict[str, Any]:
    """Run the trigger to its first event, here in the parent, as the triggerer would."""
    from anthropic_batch.triggers import BatchPollTrigger

    assert deferred["classpath"] == "anthropic_batch.triggers.BatchPollTrigger", deferred["classpath"]

    async def first() -> dict[str, Any]:
        async for event in BatchPollTrigger(**deferred["kwargs"]).run():
            return event.payload
        raise RuntimeError("the trigger ended without an event")

    return asyncio.run(first())


def run_task(stats: Stats, name: str, spec: dict[str, Any], env: dict[str, str]) -> Any:
    """One task, through all its deferrals, each resumption in a fresh process; returns its result."""
    while True:
        out, wall, cpu = _run_child(spec, env)
        stats.add(name, wall, cpu, out["peak_mb"])
        if out["deferred"] is None:
            return out["result"]
        event = _trigger_event(out["deferred"])
        spec = {**spec, "resume": {"method": out["deferred"]["method"], "event": event}}


def run_pipeline(n: int, directory: Path) -> dict[str, Any]:
    from batches_emulator.testing import EmulatorProcess

    source = directory / "tickets.parquet"
    write_input(source, n)
    root = directory / "root"
    work_dir = f"file://{root}/{PIPELINE}/work/date={PARTITION}"
    extraction_dir = f"file://{root}/{PIPELINE}/extractions/date={PARTITION}"
    stats = Stats()
    with EmulatorProcess(*EMULATOR_FLAGS, db_path=directory / "emulator.sqlite") as emu:
        conn = {"conn_type": "anthropic", "password": emu.api_key, "host": emu.base_url}
        env = {**os.environ, "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(conn)}
        os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = env["AIRFLOW_CONN_ANTHROPIC_DEFAULT"]
        t_start = time.perf_counter()
        chunks = run_task(
            stats,
            "prepare",
            {"task": "prepare", "task_id": "prepare", "args": {"source": str(source), "work_dir": work_dir}},
            env,
        )
        results_paths = []
        for i, chunk in enumerate(chunks):
            common = {"map_index": i}
            handle = run_task(
                stats,
                "submit",
                {
                    **common,
                    "task": "submit",
                    "task_id": "batch.submit",
                    "args": {"chunk_path": chunk, "work_dir": work_dir, "storage_root": f"file://{root}"},
                },
                env,
            )
            run_task(
                stats,
                "wait",
                {**common, "task": "wait", "task_id": "batch.wait", "args": {"handle": handle}},
                env,
            )
            results_paths.append(
                run_task(
                    stats,
                    "collect",
                    {
                        **common,
                        "task": "collect",
                        "task_id": "batch.collect",
                        "args": {"handle": handle, "work_dir": work_dir},
                    },
                    env,
                )
            )
        merged_path = run_task(
            stats,
            "resubmit",
            {
                "task": "resubmit",
                "task_id": "resubmit",
                "args": {
                    "results_paths": results_paths,
                    "work_dir": work_dir,
                    "storage_root": f"file://{root}",
                },
            },
            env,
        )
        summary = run_task(
            stats,
            "publish",
            {
                "task": "publish",
                "task_id": "publish",
                "args": {"work_dir": work_dir, "merged_path": merged_path, "extraction_dir": extraction_dir},
            },
            env,
        )
        total_wall = time.perf_counter() - t_start
    output = _published_data(root)
    floor_stats = Stats()
    run_task(
        floor_stats,
        "floor",
        {
            "task": "floor",
            "args": {"input": str(source), "output": str(output), "copy": str(directory / "floor.parquet")},
        },
        env,
    )
    # The second floor: the same, plus render, JSON-encode and decode a request per record.
    base_params = directory / "base_params.json"
    base_params.write_text(json.dumps(_base_params()))
    run_task(
        floor_stats,
        "floor_per_record",
        {
            "task": "floor_per_record",
            "args": {
                "input": str(source),
                "output": str(output),
                "copy": str(directory / "floor2.parquet"),
                "template": str(REPO / "include" / "prompts" / "support_ticket.j2"),
                "base_params": str(base_params),
            },
        },
        env,
    )
    startup_stats = Stats()
    run_task(startup_stats, "startup", {"task": "startup", "args": {}}, env)
    return {
        "n": n,
        "chunks": len(chunks),
        "startup": startup_stats.rows["startup"],
        "tasks": stats.rows,
        "floor": floor_stats.rows["floor"],
        "floor_per_record": floor_stats.rows["floor_per_record"],
        "total_wall": total_wall,
        "summary": {k: summary.get(k) for k in ("n_rows", "counts_by_status", "n_dead_letters", "attempts")},
    }


def _base_params() -> dict[str, Any]:
    """The params every request of the benchmark shares (what prepare builds, messages apart)."""
    from anthropic_batch.batch_requests import RequestSpec
    from anthropic_batch.output_models import load_output_model

    model = load_output_model("schemas/support_ticket.py:SupportTicketExtraction", REPO / "include")
    return RequestSpec(model=MODEL, max_tokens=512, prompt_template="-", output_model=model).base_params()


def _published_data(root: Path) -> Path:
    """The published data.parquet (directly in date=D/ or in the committed generation)."""
    found = sorted((root / PIPELINE / "extractions" / f"date={PARTITION}").rglob("data.parquet"))
    if not found:
        raise RuntimeError("publish wrote no data.parquet")
    return found[-1]


def report(result: dict[str, Any]) -> bool:
    n, tasks, floor = result["n"], result["tasks"], result["floor"]
    print(f"\n{n:,} records, {result['chunks']} chunk(s); published: {result['summary']}")
    header = f"{'task':<10} {'procs':>5} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}"
    print(f"{header}  RSS < {RSS_TARGET_MB:.0f} MB")
    ok = True
    for name, row in tasks.items():
        passed = row["peak_mb"] < RSS_TARGET_MB
        ok = ok and passed
        numbers = f"{row['processes']:>5} {row['wall']:>8.1f} {row['cpu']:>8.1f} {row['peak_mb']:>12.0f}"
        print(f"{name:<10} {numbers}  {'PASS' if passed else 'MISS'}")
    total_cpu = sum(row["cpu"] for row in tasks.values())
    numbers = f"{1:>5} {floor['wall']:>8.1f} {floor['cpu']:>8.1f} {floor['peak_mb']:>12.0f}"
    print(f"{'floor':<10} {numbers}  (pyarrow alone)")
    ratio = total_cpu / floor["cpu"] if floor["cpu"] else float("inf")
    cpu_ok = ratio <= CPU_RATIO_TARGET
    per_record = result.get("floor_per_record")
    if per_record:
        numbers = (
            f"{1:>5} {per_record['wall']:>8.1f} {per_record['cpu']:>8.1f} {per_record['peak_mb']:>12.0f}"
        )
        print(f"{'floor2':<10} {numbers}  (+ render, JSON-encode and decode a request per record)")
    startup = result["startup"]
    n_procs = sum(row["processes"] for row in tasks.values())
    net_cpu = total_cpu - n_procs * startup["cpu"]
    print(
        f"start-up of one task process (interpreter, Airflow, our modules): {startup['cpu']:.1f}s CPU, "
        f"{startup['peak_mb']:.0f} MB; our {n_procs} processes less start-up: {net_cpu:.1f}s CPU = "
        f"{net_cpu / floor['cpu']:.1f}x the floor (information)"
    )
    print(
        f"total: wall {result['total_wall']:.0f}s (emulator waits included), "
        f"CPU of our tasks {total_cpu:.1f}s = {ratio:.1f}x the floor "
        f"(target <= {CPU_RATIO_TARGET:.0f}x)  {'PASS' if cpu_ok else 'MISS'}"
    )
    if per_record and per_record["cpu"]:
        print(
            f"against floor2 (the per-record work no implementation skips): CPU of our tasks "
            f"{total_cpu / per_record['cpu']:.1f}x, less start-up {net_cpu / per_record['cpu']:.1f}x "
            "(information)"
        )
    return ok and cpu_ok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks bench_pipeline")
    parser.add_argument(
        "--records",
        type=int,
        default=int(os.environ.get("BENCH_PIPELINE_RECORDS", "100000")),
        help="records a day",
    )
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        result = run_pipeline(args.records, Path(tmp))
    result["ok"] = report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
