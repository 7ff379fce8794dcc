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


def test_prepare_writes_exactly_the_manifest_it_returns(tmp_path):
    from anthropic_batch.batch_requests import RequestSpec, prepare_requests
    from tests.plugins.anthropic_batch.test_batch_requests import tickets

    work = storage.as_path((tmp_path / "work").as_uri())
    spec = RequestSpec(model="claude-haiku-4-5", max_tokens=10, prompt_template="{{ subject }}")
    manifest = prepare_requests(tickets(5), ["ticket_id"], spec, work, extra_manifest={"source": "s.jsonl"})
    on_disk = json.loads(layout.manifest_path(work).read_text())
    assert on_disk == manifest.model_dump(mode="json") and Manifest.model_validate(on_disk) == manifest
    # The on-disk names are the ones readers used before the models existed.
    assert {"chunks", "n_requests", "n_rejected", "n_input_records", "spec", "mode", "source"} <= set(on_disk)
    assert set(on_disk["chunks"][0]) == {"index", "path", "n_requests", "n_bytes", "fingerprint"}


def test_a_bad_published_summary_names_the_file_and_the_field(tmp_path):
    from anthropic_batch import partition

    path = storage.as_path(str(tmp_path / "summary.json"))
    storage.atomic_write_json(path, {"dag_id": "d", "counts_by_status": [1, 2]})
    with pytest.raises(ContractError, match=r"summary\.json.*counts_by_status"):
        partition.read_run_summary(path)
    assert partition.read_run_summary(storage.as_path(str(tmp_path / "none.json"))) is None


def test_the_index_skips_a_bad_summary_and_logs_why(tmp_path, caplog):
    from anthropic_batch import run_index

    root = storage.as_path(str(tmp_path / "store"))
    good = storage.extraction_dir(root, "pipe", "2026-11-01") / "summary.json"
    bad = storage.extraction_dir(root, "pipe", "2026-11-02") / "summary.json"
    storage.atomic_write_json(good, {"dag_id": "d", "cost_usd": 1.0})
    storage.atomic_write_json(bad, {"dag_id": "d", "cost_usd": "a lot"})
    found = run_index.summaries(root)
    assert [(s.partition, s.pipeline, s.cost_usd) for s in found] == [("2026-11-01", "pipe", 1.0)]
    assert "date=2026-11-02/summary.json" in caplog.text and "cost_usd" in caplog.text
