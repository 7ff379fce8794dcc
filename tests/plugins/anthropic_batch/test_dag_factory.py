"""YAML pipeline -> DAG: the shape, the mapped batch group, pool, params, docs and the Asset outlet."""

from __future__ import annotations

import pytest

from anthropic_batch.dag_factory import (
    PARTITION_TEMPLATE,
    _as_path_list,
    build_all,
    build_pipeline_dag,
    ensure_pool_command,
    ensure_pool_commands,
    pipeline_pool,
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
        assert int(created[3]) == config.pool_slots_total and "--include-deferred" in created
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
