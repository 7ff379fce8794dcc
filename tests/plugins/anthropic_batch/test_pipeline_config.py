"""The YAML pipeline schema: shipped pipelines load; bad files fail with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anthropic_batch.pipeline_config import (
    PIPELINES_DIR,
    PipelineConfigError,
    load_pipeline,
    load_pipelines,
    scan_pipelines,
)

VALID = {
    "name": "tiny",
    "description": "A tiny pipeline.",
    "start_date": "2026-11-01",
    "source": "/tmp/in/date={{ ds }}/x.jsonl",
    "key_columns": ["id"],
    "prompt_template": "Say {{ text }}",
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
}


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_pipelines_load():
    configs = {c.resolved_dag_id: c for c in load_pipelines(PIPELINES_DIR)}
    assert {"bulk_extraction", "weekly_code_audit"} <= set(configs)
    bulk = configs["bulk_extraction"]
    assert bulk.output_model == "schemas/support_ticket.py:SupportTicketExtraction"
    assert "{{ batch_partition() }}" in bulk.source
    assert bulk.pool_slots_total == bulk.queue_budget_requests // bulk.max_requests_per_chunk
    # A per-request ceiling, separate from the chunk size (which keeps its 200 MiB default).
    assert bulk.max_request_bytes == 262_144
    assert bulk.max_bytes_per_chunk == 200 * 1024 * 1024


def test_defaults_and_derived_values(tmp_path):
    cfg = load_pipeline(_write(tmp_path, "tiny", VALID))
    assert cfg.resolved_dag_id == "tiny"
    assert cfg.mode == "batch"
    assert cfg.sample.size == 20 and cfg.resubmit.max_attempts == 3
    assert cfg.pool_slots_total == 1
    assert cfg.max_request_bytes is None and cfg.max_bytes_per_chunk == 200 * 1024 * 1024
    assert cfg.asset_uri == "anthropic-batch://tiny/extractions"


def test_name_defaults_to_file_stem(tmp_path):
    data = {k: v for k, v in VALID.items() if k != "name"}
    assert load_pipeline(_write(tmp_path, "from_stem", data)).name == "from_stem"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"mode": "fast"}, "mode"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"key_columns": []}, "key_columns"),
        ({"name": "Bad-Name"}, "name"),
        ({"output_model": "schemas/nope.py:Model"}, "output_model"),
        ({"output_model": "not a ref"}, "output_model"),
        # The file exists but the class name has a typo: refused at DAG import, naming the class.
        ({"output_model": "schemas/support_ticket.py:SupportTicketExtractoin"}, "SupportTicketExtractoin"),
        ({"schedule": "every night"}, "schedule"),
        ({"prompt_template": "prompts/missing.j2"}, "prompt_template"),
        ({"sample": {"min_pass_rate": 1.5}}, "sample.min_pass_rate"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"max_requests_per_chunk": 500, "queue_budget_requests": 100}, "queue_budget_requests"),
        ({"max_request_bytes": 10}, "max_request_bytes"),
        ({"max_request_bytes": 4096, "max_bytes_per_chunk": 2048}, "max_request_bytes"),
    ],
)
def test_invalid_fields_are_named(tmp_path, change, field):
    path = _write(tmp_path, "bad", {**VALID, **change})
    with pytest.raises(PipelineConfigError) as err:
        load_pipeline(path)
    message = str(err.value)
    assert str(path) in message
    assert field in message


def test_not_yaml_and_not_mapping(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(PipelineConfigError, match="not valid YAML"):
        load_pipeline(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(PipelineConfigError, match="must hold a mapping"):
        load_pipeline(listing)


def test_loader_reports_every_bad_file_and_duplicate_ids(tmp_path):
    _write(tmp_path, "one", {**VALID, "name": "one", "dag_id": "same"})
    _write(tmp_path, "two", {**VALID, "name": "two", "dag_id": "same"})
    _write(tmp_path, "three", {**VALID, "name": "three", "max_tokens": -1})
    with pytest.raises(PipelineConfigError) as err:
        load_pipelines(tmp_path)
    assert "three.yaml" in str(err.value)
    assert "'same' is declared by several pipeline files" in str(err.value)


def test_resubmit_retry_truncated_is_declared_per_pipeline(tmp_path):
    assert load_pipeline(_write(tmp_path, "unset", VALID)).resubmit.retry_truncated is None  # by output model
    on = load_pipeline(_write(tmp_path, "on", {**VALID, "resubmit": {"retry_truncated": True}}))
    assert on.resubmit.retry_truncated is True
    with pytest.raises(PipelineConfigError, match="retry_truncated"):
        load_pipeline(_write(tmp_path, "bad", {**VALID, "resubmit": {"retry_truncated": "sometimes"}}))


def test_output_model_must_be_a_pydantic_model(tmp_path):
    # `Category` exists in the schema file, but it is an enum, not a model.
    path = _write(tmp_path, "bad", {**VALID, "output_model": "schemas/support_ticket.py:Category"})
    with pytest.raises(PipelineConfigError, match=r"output_model: .*Category is not a pydantic BaseModel"):
        load_pipeline(path)


def test_scan_keeps_the_valid_pipelines_and_describes_the_bad_ones(tmp_path):
    _write(tmp_path, "good", {**VALID, "name": "good"})
    _write(tmp_path, "typo", {**VALID, "name": "typo", "output_model": "schemas/support_ticket.py:Nope"})
    _write(tmp_path, "one", {**VALID, "name": "one", "dag_id": "same"})
    _write(tmp_path, "two", {**VALID, "name": "two", "dag_id": "same"})
    configs, problems = scan_pipelines(tmp_path)
    assert [c.name for c in configs] == ["good"]
    assert len(problems) == 2
    assert "typo.yaml" in problems[0] and "Nope" in problems[0]
    assert "'same'" in problems[1] and "one.yaml" in problems[1] and "two.yaml" in problems[1]


def test_system_prompt_names_a_file_under_include_or_is_inline(tmp_path):
    rubric = {**VALID, "system_prompt": "prompts/code_audit_rubric.md"}
    cfg = load_pipeline(_write(tmp_path, "rubric", rubric))
    assert cfg.system_prompt == "prompts/code_audit_rubric.md"  # prepare reads it at run time
    inline = load_pipeline(_write(tmp_path, "inline", {**VALID, "system_prompt": "Be brief."}))
    assert inline.system_prompt == "Be brief."


@pytest.mark.parametrize("ref", ["prompts/missing.md", "../README.md"])
def test_missing_system_prompt_file_is_refused_naming_the_field(tmp_path, ref):
    path = _write(tmp_path, "bad_rubric", {**VALID, "system_prompt": ref})
    with pytest.raises(PipelineConfigError) as exc:
        load_pipeline(path)
    assert str(path) in str(exc.value) and "system_prompt" in str(exc.value)
    assert f"file {ref} not found" in str(exc.value)
