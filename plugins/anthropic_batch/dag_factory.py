"""YAML pipeline -> DAG.

``build_pipeline_dag(config)`` builds one DAG per declared pipeline::

    prepare -> sample_refine -> batch[i](submit -> collect) -> gather_results -> resubmit -> publish

``batch`` is a *mapped task group* expanded over the chunk paths ``prepare`` returns, so the
collector of chunk *i* waits for the batch of chunk *i* only (index-aligned), and each chunk moves
on as soon as its own batch ends. ``submit`` creates the batch *and* waits for it (deferred), so the
chunk holds its admission ticket (or, in a pool that counts deferred tasks, its slot) from create
to end. ``resubmit`` takes every collected results path, retries what is retriable in follow-up
batches and merges; ``publish`` writes the partition and updates the pipeline's Asset (``anthropic-batch://{pipeline}/extractions``).

Schedule and partition: a cron ``schedule`` becomes a ``CronDataIntervalTimetable`` (not Airflow 3's
default ``CronTriggerTimetable``), so the run for a day starts once that day has *ended*, and its
logical date is the start of the interval it covers. Partition = the run's logical date as
``YYYY-MM-DD`` (``run_partition``): a scheduled run processes the interval that just ended, a backfill
of D processes D, a manual or REST run with a logical date L processes L's date, and a manual run
without a logical date processes the start of the last complete interval. A re-run of a date finds
its earlier submissions in the ledger.

Queue budget: every batch of a pipeline takes an admission ticket (:mod:`anthropic_batch.queue_budget`)
that enforces ``queue_budget_requests`` in requests, and the optional deployment-wide budget across
all pipelines; the ticket is held from admission until the batch ends. ``submit`` (create + wait)
and ``resubmit`` (one retry batch at a time) run in the pipeline's own pool
``anthropic_batches_{name}`` of ``queue_budget_requests // max_requests_per_chunk`` slots
(``PipelineConfig.pool_slots_total``), which does *not* count deferred tasks: a chunk waiting for
admission is deferred, and if it held a slot, the chunks already admitted (or whose batch ended)
could not get one back to create their batch (or release their ticket): a deadlock seen on the real
scheduler. The pools must exist::

    airflow pools set anthropic_batches_<name> <slots> "Anthropic batch queue"

(``ensure_pool_commands`` gives the exact commands; the demo and the e2e set-up run them.) The shared
pool ``anthropic_batches`` (DAGs that call :func:`add_batch_stage` without a budget) counts deferred
tasks: there it is the only limit.

Mode: the DAG param ``mode`` (batch | sync | auto, default from the YAML) is resolved by ``prepare``
and recorded in the manifest; every later task follows the manifest.

This module is imported while DAG files are parsed: it imports only Airflow authoring names and the
pipeline schema at module level; the operators are imported when a DAG is built.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, task, task_group

from anthropic_batch import layout
from anthropic_batch.layout import PARTITION_TEMPLATE
from anthropic_batch.operators.collect import CollectResultsOperator
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.operators.publish import PublishPartitionOperator
from anthropic_batch.operators.resubmit import ResubmitFailuresOperator
from anthropic_batch.operators.sample_refine import SampleRefineOperator
from anthropic_batch.operators.submit import SubmitBatchOperator
from anthropic_batch.pipeline_config import INCLUDE_DIR, POOL_NAME, PipelineConfig

#: Demos and tests shorten every poll interval with this env var (seconds), read at parse time.
POLL_INTERVAL_ENV = "ANTHROPIC_BATCH_POLL_INTERVAL"


def pipeline_timetable(schedule: str | None) -> Any:
    """The timetable of a pipeline's ``schedule``: a cron expression or preset becomes a data interval.

    ``CronDataIntervalTimetable`` runs the interval [D, D+1) after it ends, with logical date D, so
    "@daily" processes the day that just ended. ``@once``, ``@continuous`` and None pass through.
    """
    if schedule is None or schedule in ("@once", "@continuous"):
        return schedule
    return CronDataIntervalTimetable(schedule, timezone="UTC")


def last_complete_interval_start(schedule: str | None, run_after: dt.datetime) -> dt.datetime:
    """Start of the last interval of ``schedule`` that had ended by ``run_after`` (UTC).

    Without a cron schedule (None, ``@once``, ``@continuous``) an interval is one day: yesterday.
    """
    # croniter: only to read a schedule
    from croniter import croniter

    run_after = run_after.astimezone(dt.UTC).replace(tzinfo=None)
    timetable = pipeline_timetable(schedule)
    if not isinstance(timetable, CronDataIntervalTimetable):
        start = dt.datetime.combine(run_after.date() - dt.timedelta(days=1), dt.time())
        return start.replace(tzinfo=dt.UTC)
    expression = timetable.expression  # presets such as "@daily" resolved to cron
    fires = croniter(expression, run_after)
    end = run_after if croniter.match(expression, run_after) else fires.get_prev(dt.datetime)
    start = croniter(expression, end).get_prev(dt.datetime)
    return start.replace(tzinfo=dt.UTC)


def run_partition(logical_date: dt.datetime | None, run_after: dt.datetime, schedule: str | None) -> str:
    """The ``YYYY-MM-DD`` partition a run processes (the DAG macro ``batch_partition``).

    The logical date (UTC) when the run has one: for a scheduled or backfill run that is the start of
    its data interval. A run without one (Airflow 3 allows manual runs without a logical date)
    processes the last interval that had ended when it was triggered, never a day still in progress.
    """
    when = logical_date if logical_date is not None else last_complete_interval_start(schedule, run_after)
    return when.astimezone(dt.UTC).date().isoformat()


def partition_macro(schedule: str | None) -> Any:
    """The DAG macro ``batch_partition()``: ``run_partition`` of the run being rendered."""
    # jinja2: only where a template is rendered
    import jinja2

    @jinja2.pass_context
    def batch_partition(context: Any) -> str:
        run = context["dag_run"]
        return run_partition(run.logical_date, run.run_after, schedule)

    return batch_partition


def storage_root_url(override: str | None = None) -> str:
    """The storage root as a URL string, resolved when a task renders its templates (a DAG macro)."""
    from anthropic_batch import storage  # pyarrow is imported there; keep it out of DAG parsing

    return str(storage.storage_root(override)).rstrip("/")


def ensure_pool_command(configs: list[PipelineConfig]) -> list[str]:
    """``airflow pools set`` arguments for the shared pool (DAGs that call :func:`add_batch_stage`
    without a pool, e.g. the overnight report), sized for the largest pipeline budget."""
    slots = max((c.pool_slots_total for c in configs), default=1)
    return ["pools", "set", POOL_NAME, str(slots), "Queued Anthropic batches", "--include-deferred"]


def pipeline_pool(config: PipelineConfig) -> str:
    """The pool of one pipeline's batch tasks: its own, so pipelines do not share slots."""
    return f"{POOL_NAME}_{config.name}"


def ensure_pool_commands(configs: list[PipelineConfig]) -> list[list[str]]:
    """``airflow pools set`` arguments for every pool the pipelines need: one per pipeline (sized
    ``pool_slots_total``; deferred tasks do not count, the admission tickets hold the budget, see
    the module docstring) plus the shared one."""
    commands = [ensure_pool_command(configs)]
    for config in configs:
        description = f"Anthropic batches of {config.name}: {config.queue_budget_requests} requests"
        commands.append(["pools", "set", pipeline_pool(config), str(config.pool_slots_total), description])
    return commands


def _poll_intervals(config: PipelineConfig) -> tuple[float, float]:
    override = os.environ.get(POLL_INTERVAL_ENV)
    if override:
        seconds = float(override)
        return seconds, max(seconds, min(config.max_poll_interval, seconds * 4))
    return config.poll_interval, config.max_poll_interval


def _answer_cache_doc(config: PipelineConfig) -> str:
    if not config.reuse_answers.enabled:
        return "off (answers are reused within a date only)"
    return f"on: answers up to {config.reuse_answers.max_age_days} days old are reused across dates"


def _doc_md(config: PipelineConfig) -> str:
    lines = [
        f"# {config.resolved_dag_id}",
        "",
        config.description.strip(),
        "",
        "| setting | value |",
        "|---|---|",
        f"| source | `{config.source}` |",
        f"| model | `{config.model}` (max_tokens {config.max_tokens}) |",
        f"| output model | `{config.output_model or 'free text'}` ({config.output_mode}) |",
        f"| default mode | `{config.mode}` (auto: sync up to {config.auto_sync_max_requests} requests) |",
        f"| sample gate | {config.sample.size} requests, pass rate >= {config.sample.min_pass_rate} |",
        f"| budget | {config.budget.max_cost_usd or 'none'} USD |",
        f"| resubmits | up to {config.resubmit.max_attempts} attempts |",
        f"| answer cache | {_answer_cache_doc(config)} |",
        f"| queue | {config.queue_budget_requests} requests; chunks of <= {config.max_requests_per_chunk} |",
        "",
        "Partition (`YYYY-MM-DD`) = the run's logical date: a scheduled run processes the interval that "
        "just ended, a backfill of D processes D, a manual run with logical date L processes L, one "
        "without a logical date the last complete interval. Trigger with param `mode` = batch | sync | auto.",
        f"Published to `{config.name}/extractions/date=YYYY-MM-DD/` and the Asset `{config.asset_uri}`.",
    ]
    return "\n".join(lines)


def add_batch_stage(
    chunk_paths: Any,
    *,
    work_dir: str,
    storage_root: str | None,
    after: Any = None,
    retries: int = 2,
    poll_interval: float = 30.0,
    max_poll_interval: float = 600.0,
    deadline_hours: float = 30.0,
    skip_if_no_chunks: bool = False,
    pool: str = POOL_NAME,
    queue_budget_requests: int | None = None,
) -> Any:
    """``batch`` mapped task group over ``chunk_paths``: submit (create and wait) -> collect.

    Call inside a ``with dag:`` block. ``after`` (a task) runs before every submit. ``pool`` (one
    slot per chunk; held from create to end in the shared pool, which counts deferred tasks) and
    ``queue_budget_requests`` (admission, see :mod:`anthropic_batch.queue_budget`) bound the
    requests in progress. Returns the
    collected results paths as a list (the XComArg of a small ``gather_results`` task). With no chunks
    the group is skipped; ``gather_results`` still runs (an empty list, so the run can publish its
    rejects) unless ``skip_if_no_chunks``, which lets the skip flow downstream.
    """

    @task_group(group_id="batch")
    def batch(chunk_path: str):
        # One deferrable task from create to end: its ticket (or a slot of a pool that counts
        # deferred tasks) is never released between the submit and the wait, so nothing slips in.
        submit = SubmitBatchOperator(
            task_id="submit",
            chunk_path=chunk_path,
            work_dir=work_dir,
            storage_root=storage_root,
            pool=pool,
            wait=True,
            queue_budget_requests=queue_budget_requests,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            deadline_hours=deadline_hours,
            # Idempotent through the ledger: a retry finds the earlier submission instead of paying twice.
            retries=retries,
        )
        collect = CollectResultsOperator(task_id="collect", handle=submit.output, work_dir=work_dir)
        if after is not None:
            after >> submit
        submit >> collect
        return collect.output

    collected = batch.expand(chunk_path=chunk_paths)
    if skip_if_no_chunks:
        return gather_results.override(trigger_rule="all_success")(collected)
    return gather_results(collected)


def _as_path_list(paths: Any) -> list[str]:
    """The collected paths as a list (Airflow hands a one-chunk run a bare string, a zero-chunk run None)."""
    if paths is None:
        return []
    if isinstance(paths, str):
        return [paths]
    return [str(p) for p in paths if p]


@task(task_id="gather_results", trigger_rule="none_failed")
def gather_results(paths: Any) -> list[str]:
    """Every chunk's collected results path, as a list (also for one chunk, or none)."""
    return _as_path_list(paths)


def build_pipeline_dag(config: PipelineConfig) -> DAG:
    """The DAG for one declared pipeline (see the module docstring for its shape)."""

    root = layout.storage_root_template(config.storage_root)
    work_dir = layout.work_dir_template(root, config.name, PARTITION_TEMPLATE)
    extraction_dir = layout.extraction_dir_template(root, config.name, PARTITION_TEMPLATE)
    poll_interval, max_poll_interval = _poll_intervals(config)

    default_args: dict[str, Any] = {
        "owner": config.owner,
        "retries": config.retries,
        "retry_delay": dt.timedelta(seconds=30),
    }
    dag = DAG(
        dag_id=config.resolved_dag_id,
        description=config.description.strip().splitlines()[0][:200],
        doc_md=_doc_md(config),
        schedule=pipeline_timetable(config.schedule),
        start_date=dt.datetime.combine(config.start_date, dt.time(), tzinfo=dt.UTC),
        catchup=config.catchup,
        tags=sorted({*config.tags, "anthropic-batch"}),
        max_active_runs=config.max_active_runs,
        default_args=default_args,
        params={
            "mode": Param(
                config.mode,
                enum=["batch", "sync", "auto"],
                description="batch: Message Batches (50% price); sync: Messages API now; "
                "auto: sync for small runs or a near deadline, else batch",
            ),
            "deadline": Param(
                None,
                type=["null", "string"],
                description="When the results are needed (RFC 3339, e.g. 2026-11-25T06:00:00Z). "
                "With mode=auto, a deadline less than 24 h away picks sync.",
            ),
        },
        user_defined_macros={
            "batch_storage_root": storage_root_url,
            "batch_partition": partition_macro(config.schedule),
        },
    )
    with dag:
        prepare = PrepareRequestsOperator(
            task_id="prepare",
            source=config.source,
            source_format=config.source_format,
            key_columns=list(config.key_columns),
            prompt_template=config.prompt_template,
            model=config.model,
            max_tokens=config.max_tokens,
            system_prompt=config.system_prompt,
            output_model=config.output_model,
            output_mode=config.output_mode if config.output_model else None,
            extra_params=config.extra_params,
            include_dir=str(INCLUDE_DIR),
            work_dir=work_dir,
            pipeline=config.name,
            partition=PARTITION_TEMPLATE,
            mode="{{ params.mode }}",
            deadline="{{ params.deadline or '' }}",
            auto_sync_max_requests=config.auto_sync_max_requests,
            max_requests_per_chunk=config.max_requests_per_chunk,
            max_bytes_per_chunk=config.max_bytes_per_chunk,
            max_request_bytes=config.max_request_bytes,
            answer_cache_max_age_days=(
                config.reuse_answers.max_age_days if config.reuse_answers.enabled else None
            ),
        )
        gate = SampleRefineOperator(
            task_id="sample_refine",
            work_dir=work_dir,
            sample_size=config.sample.size,
            seed=config.sample.seed,
            min_pass_rate=config.sample.min_pass_rate,
            max_cost_usd=config.budget.max_cost_usd,
            use_count_tokens=config.sample.use_count_tokens,
        )

        collected = add_batch_stage(
            prepare.output,
            work_dir=work_dir,
            storage_root=config.storage_root,
            after=gate,
            retries=config.retries,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            deadline_hours=config.deadline_hours,
            pool=pipeline_pool(config),
            queue_budget_requests=config.queue_budget_requests,
        )
        resubmit = ResubmitFailuresOperator(
            task_id="resubmit",
            results_paths=collected,
            work_dir=work_dir,
            max_attempts=config.resubmit.max_attempts,
            max_tokens_growth=config.resubmit.max_tokens_growth,
            retry_truncated=config.resubmit.retry_truncated,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            deadline_hours=config.deadline_hours,
            storage_root=config.storage_root,
            max_requests_per_chunk=config.max_requests_per_chunk,
            max_bytes_per_chunk=config.max_bytes_per_chunk,
            pool=pipeline_pool(config),
            queue_budget_requests=config.queue_budget_requests,
            # A day whose records were all rejected has no chunks (the batch group is skipped); it is
            # still published, with every record in the dead-letter table.
            trigger_rule="none_failed",
        )
        publish = PublishPartitionOperator(
            task_id="publish",
            work_dir=work_dir,
            merged_path=resubmit.output,
            extraction_dir=extraction_dir,
            pipeline=config.name,
            outlets=[Asset(config.asset_uri, extra={"pipeline": config.name})],
            trigger_rule="none_failed",
        )
        prepare >> gate
        resubmit >> publish
    return dag


def build_all(configs: list[PipelineConfig]) -> dict[str, DAG]:
    """``{dag_id: DAG}`` for every pipeline (what ``dags/pipelines.py`` puts in its globals)."""
    return {c.resolved_dag_id: build_pipeline_dag(c) for c in configs}
