"""YAML pipeline -> DAG: the shape, the mapped batch group, pool, params, docs and the Asset outlet."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from anthropic_batch.dag_factory import (
    PARTITION_TEMPLATE,
    _as_path_list,
    build_all,
    build_pipeline_dag,
    ensure_pool_command,
    ensure_pool_commands,
    pipeline_pool,
    run_partition,
)
from anthropic_batch.pipeline_config import POOL_NAME, load_pipelines


@pytest.fixture(scope="module")
def configs():
    return {c.name: c for c in load_pipelines()}


@pytest.fixture(scope="module")
def bulk(configs):
    return build_pipeline_dag(configs["bulk_extraction"])


def test_task_chain(bulk):
    assert set(bulk.task_ids) == {
        "prepare",
        "sample_refine",
        "batch.submit",
        "batch.collect",
        "gather_results",
        "resubmit",
        "publish",
    }
    assert bulk.get_task("sample_refine").upstream_task_ids == {"prepare"}
    assert bulk.get_task("batch.submit").upstream_task_ids == {"prepare", "sample_refine"}
    assert bulk.get_task("batch.collect").upstream_task_ids == {"batch.submit"}
    assert bulk.get_task("gather_results").upstream_task_ids == {"batch.collect"}
    assert bulk.get_task("resubmit").upstream_task_ids == {"gather_results"}
    assert bulk.get_task("publish").upstream_task_ids == {"resubmit"}


def test_batch_group_is_mapped_over_prepare_so_indices_align(bulk):
    group = bulk.task_group_dict["batch"]
    assert type(group).__name__ == "MappedTaskGroup"
    (expand_input,) = [group._expand_input]
    assert "chunk_path" in expand_input.value
    # every task of the group is mapped through the group, not expanded on its own
    for task_id in ("batch.submit", "batch.collect"):
        task = bulk.get_task(task_id)
        assert task.task_group.group_id == "batch"


def test_pool_and_deferral(bulk, configs):
    """Each pipeline has its own pool; submit creates *and* waits (one slot from create to end)."""
    cfg = configs["bulk_extraction"]
    for task_id in ("batch.submit", "resubmit"):
        assert bulk.get_task(task_id).pool == pipeline_pool(cfg)
        assert bulk.get_task(task_id).queue_budget_requests == cfg.queue_budget_requests
    assert bulk.get_task("batch.submit").wait is True
    assert bulk.get_task("prepare").pool != pipeline_pool(cfg)
    command = ensure_pool_command(list(configs.values()))
    assert command[:3] == ["pools", "set", POOL_NAME] and "--include-deferred" in command
    assert int(command[3]) == max(c.pool_slots_total for c in configs.values())
    commands = {c[2]: c for c in ensure_pool_commands(list(configs.values()))}
    for config in configs.values():
        created = commands[pipeline_pool(config)]
        # Deferred tasks (admission waits) must not hold pipeline slots: the tickets hold the budget.
        assert int(created[3]) == config.pool_slots_total and "--include-deferred" not in created
    assert len({pipeline_pool(c) for c in configs.values()}) == len(configs)


def test_params_docs_tags_owner_schedule(bulk, configs):
    cfg = configs["bulk_extraction"]
    assert bulk.params["mode"] == cfg.mode
    assert bulk.max_active_runs == cfg.max_active_runs
    assert "anthropic-batch" in bulk.tags and set(cfg.tags) <= set(bulk.tags)
    assert cfg.description.split()[0] in bulk.doc_md
    assert bulk.default_args["owner"] == cfg.owner
    assert not bulk.catchup


def test_templated_partition_paths(bulk):
    prepare = bulk.get_task("prepare")
    assert prepare.partition == PARTITION_TEMPLATE
    assert prepare.work_dir.endswith(f"/bulk_extraction/work/date={PARTITION_TEMPLATE}")
    assert prepare.mode == "{{ params.mode }}"
    # The run's deadline reaches prepare, where mode=auto turns a near deadline into sync.
    assert bulk.params["deadline"] is None
    assert prepare.deadline == "{{ params.deadline or '' }}"
    assert prepare.max_request_bytes == 262_144  # the YAML's per-request ceiling reaches the operator
    publish = bulk.get_task("publish")
    assert publish.extraction_dir.endswith(f"/bulk_extraction/extractions/date={PARTITION_TEMPLATE}")


def test_publish_declares_the_pipeline_asset(bulk, configs):
    (outlet,) = bulk.get_task("publish").outlets
    assert outlet.uri == configs["bulk_extraction"].asset_uri


def test_every_pipeline_builds(configs):
    dags = build_all(list(configs.values()))
    assert set(dags) == {c.resolved_dag_id for c in configs.values()}
    audit = dags["weekly_code_audit"]
    assert audit.params["mode"] == "auto"


@pytest.mark.parametrize(
    ("xcom", "expected"),
    [(None, []), ("file:///a.parquet", ["file:///a.parquet"]), (["x", "", None, "y"], ["x", "y"])],
)
def test_collected_paths_are_always_a_list(xcom, expected):
    # Airflow resolves a one-chunk mapped group's output to a bare value and a zero-chunk one to None.
    assert _as_path_list(xcom) == expected


def test_empty_day_still_publishes_but_the_report_skips(bulk):
    # No chunks: the batch group is skipped, gather_results still runs so the rejects get published.
    assert bulk.get_task("gather_results").trigger_rule == "none_failed"
    assert bulk.get_task("publish").trigger_rule == "none_failed"
    from airflow.dag_processing.dagbag import DagBag

    from tests.dags.conftest import DAGS_DIR

    report = DagBag(dag_folder=str(DAGS_DIR / "overnight_report.py")).dags["overnight_report"]
    assert report.get_task("gather_results").trigger_rule == "all_success"


def test_resubmit_gets_the_pipelines_truncation_retry(configs):
    cfg = configs["bulk_extraction"]
    resubmit = build_pipeline_dag(cfg).get_task("resubmit")
    assert resubmit.retry_truncated is cfg.resubmit.retry_truncated
    assert resubmit.max_attempts == cfg.resubmit.max_attempts
    on = cfg.model_copy(update={"resubmit": cfg.resubmit.model_copy(update={"retry_truncated": False})})
    assert build_pipeline_dag(on).get_task("resubmit").retry_truncated is False


# ----------------------------------------------------------------------------- schedule and partition

UTC = dt.UTC


def _core_timetable(dag):
    from airflow.serialization.encoders import coerce_to_core_timetable

    return coerce_to_core_timetable(dag.timetable)


def _render_partition(dag, *, logical_date, run_after) -> str:
    # The DAG's own template environment and macros, as a task renders PARTITION_TEMPLATE.
    env = dag.get_template_env()
    run = SimpleNamespace(logical_date=logical_date, run_after=run_after)
    return env.from_string(PARTITION_TEMPLATE).render(dag_run=run, **dag.user_defined_macros)


def _first_scheduled_run(dag, after: dt.datetime):
    from airflow.timetables.base import DataInterval, TimeRestriction

    timetable = _core_timetable(dag)
    # The run after the one whose interval ended at `after`, as the scheduler asks for it.
    previous = timetable.infer_manual_data_interval(run_after=after)
    return timetable.next_dagrun_info(
        last_automated_data_interval=DataInterval(previous.start, previous.end),
        restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=True),
    )


def test_daily_run_for_a_day_starts_after_the_day_and_processes_it(bulk):
    info = _first_scheduled_run(bulk, dt.datetime(2026, 11, 23, tzinfo=UTC))
    # The run of 2026-11-23 covers [23rd, 24th) and is due when the 23rd has ended.
    assert info.data_interval.start == dt.datetime(2026, 11, 23, tzinfo=UTC)
    assert info.data_interval.end == dt.datetime(2026, 11, 24, tzinfo=UTC)
    assert info.run_after == dt.datetime(2026, 11, 24, tzinfo=UTC)
    assert info.logical_date == info.data_interval.start
    partition = _render_partition(bulk, logical_date=info.logical_date, run_after=info.run_after)
    assert partition == "2026-11-23"


def test_weekly_run_processes_the_week_that_just_ended(configs):
    audit = build_pipeline_dag(configs["weekly_code_audit"])  # "0 3 * * 1"
    info = _first_scheduled_run(audit, dt.datetime(2026, 11, 23, 3, tzinfo=UTC))
    assert info.data_interval.start == dt.datetime(2026, 11, 23, 3, tzinfo=UTC)
    assert info.run_after == dt.datetime(2026, 11, 30, 3, tzinfo=UTC)
    assert _render_partition(audit, logical_date=info.logical_date, run_after=info.run_after) == "2026-11-23"


def test_backfill_of_a_date_processes_that_date(bulk):
    from airflow.serialization.serialized_objects import DagSerialization

    # The scheduler's view of the DAG; `airflow backfill create --from-date 2026-11-01 --to-date
    # 2026-11-03` creates one run per info of this call (models/backfill.py::_get_info_list).
    scheduler_dag = DagSerialization.from_dict(DagSerialization.to_dict(bulk))
    infos = list(
        scheduler_dag.iter_dagrun_infos_between(
            dt.datetime(2026, 11, 1, tzinfo=UTC), dt.datetime(2026, 11, 3, tzinfo=UTC)
        )
    )
    partitions = [_render_partition(bulk, logical_date=i.logical_date, run_after=i.run_after) for i in infos]
    assert partitions == ["2026-11-01", "2026-11-02", "2026-11-03"]
    # Each runs once its day has ended.
    assert [i.run_after.day for i in infos] == [2, 3, 4]


def test_manual_runs_process_a_documented_partition(bulk):
    # With a logical date L: L's date (the same as a backfill of L), whatever Airflow infers as interval.
    logical = dt.datetime(2026, 11, 23, tzinfo=UTC)
    assert _core_timetable(bulk).infer_manual_data_interval(run_after=logical).start.day == 22
    assert _render_partition(bulk, logical_date=logical, run_after=logical) == "2026-11-23"
    # Without one ("trigger now", logical_date null): the last day that has ended, never today.
    now = dt.datetime(2026, 11, 30, 9, 15, tzinfo=UTC)
    assert _render_partition(bulk, logical_date=None, run_after=now) == "2026-11-29"
    assert _render_partition(bulk, logical_date=None, run_after=dt.datetime(2026, 11, 30, tzinfo=UTC)) == (
        "2026-11-29"
    )


@pytest.mark.parametrize(
    ("schedule", "run_after", "expected"),
    [
        ("@daily", dt.datetime(2026, 11, 24, 0, 0, tzinfo=UTC), "2026-11-23"),
        ("@daily", dt.datetime(2026, 11, 24, 23, 59, tzinfo=UTC), "2026-11-23"),
        ("0 3 * * 1", dt.datetime(2026, 11, 30, 2, 59, tzinfo=UTC), "2026-11-16"),
        ("0 3 * * 1", dt.datetime(2026, 11, 30, 3, 0, tzinfo=UTC), "2026-11-23"),
        (None, dt.datetime(2026, 11, 30, 3, 0, tzinfo=UTC), "2026-11-29"),
    ],
)
def test_run_without_logical_date_gets_the_last_complete_interval(schedule, run_after, expected):
    assert run_partition(None, run_after, schedule) == expected


def test_source_template_reads_the_run_partition(bulk):
    prepare = bulk.get_task("prepare")
    env = bulk.get_template_env()
    run = SimpleNamespace(logical_date=None, run_after=dt.datetime(2026, 11, 24, 1, tzinfo=UTC))
    source = env.from_string(prepare.source).render(dag_run=run, **bulk.user_defined_macros)
    assert "/date=2026-11-23/" in source
