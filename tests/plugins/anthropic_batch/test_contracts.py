"""The typed contracts: round trips, older files, and errors that name the file and the field."""

from __future__ import annotations

import json

import pytest

from anthropic_batch import layout, storage
from anthropic_batch.contracts import ChunkInfo, ContractError, Manifest, RunSummary, parse
from anthropic_batch.pricing import CostBreakdown

CHUNK = {
    "index": 0,
    "path": "file:///w/requests/chunk-00000.jsonl",
    "n_requests": 3,
    "n_bytes": 90,
    "fingerprint": "ab",
}


def _manifest() -> Manifest:
    return Manifest(
        chunks=[ChunkInfo(**CHUNK)],
        n_requests=4,
        n_rejected=1,
        n_input_records=5,
        spec={"pipeline": "p", "partition": "2026-11-01", "model": "claude-x", "key_columns": ["id"]},
        mode="sync",
        reuse={"n_reused": 1, "n_to_send": 3, "reused_path": "file:///w/results/reused.parquet"},
    )


def test_manifest_round_trips_through_json():
    manifest = _manifest()
    again = Manifest.model_validate(json.loads(manifest.model_dump_json()))
    assert again == manifest
    assert (
        again.chunks[0].fingerprint == "ab" and again.reuse.n_reused == 1 and again.spec.key_columns == ["id"]
    )


def test_run_summary_round_trips_with_its_cost_breakdown():
    summary = RunSummary(
        pipeline="p",
        cost_usd=1.5,
        batch_ids=["msgbatch_1"],
        cost_breakdown=CostBreakdown(input_tokens=7, input_usd=0.1),
    )
    again = RunSummary.model_validate(summary.model_dump(mode="json"))
    assert again == summary and again.cost_breakdown.input_tokens == 7


def test_an_old_manifest_without_newer_fields_still_validates(tmp_path):
    # Written before answer reuse, prompt caching and the recorded source/deadline existed.
    old = {"chunks": [CHUNK], "n_requests": 3, "n_rejected": 0, "n_input_records": 3, "spec": {"model": "m"}}
    storage.atomic_write_json(layout.manifest_path(tmp_path), old)
    manifest = layout.read_manifest(tmp_path)
    assert manifest.reuse is None and manifest.reuse_or_empty.n_reused == 0
    assert manifest.mode == "batch" and manifest.spec.cache_ttl is None and manifest.cache is None


def test_an_old_summary_without_newer_fields_still_validates():
    summary = RunSummary.model_validate({"dag_id": "d", "partition": "2026-11-01", "cost_usd": 1.0})
    assert summary.cost_breakdown is None and summary.n_reused == 0 and summary.sync_takeover is None
    assert summary.sample_cost_usd is None and summary.batch_ids == []


def test_a_bad_manifest_names_the_file_and_the_field(tmp_path):
    bad = {"chunks": [{**CHUNK, "n_requests": "three"}], "n_requests": 3}
    storage.atomic_write_json(layout.manifest_path(tmp_path), bad)
    with pytest.raises(ContractError, match=r"manifest\.json.*chunks\.0\.n_requests"):
        layout.read_manifest(tmp_path)


def test_a_bad_summary_names_the_source_and_the_field():
    with pytest.raises(ContractError, match=r"summary\.json.*cost_usd") as info:
        parse(RunSummary, {"cost_usd": "a lot"}, "x/summary.json")
    assert isinstance(info.value, ValueError)
