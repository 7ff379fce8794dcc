"""SampleRefineOperator: the gate passes and fails for real, against the emulator."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import pytest
from airflow.sdk.exceptions import AirflowFailException

from anthropic_batch.batch_requests import iter_chunk_requests
from anthropic_batch.contracts import ChunkInfo, Manifest
from anthropic_batch.operators import sample_refine
from anthropic_batch.operators.sample_refine import (
    SampleRefineOperator,
    TransientSampleError,
    build_report,
    render_html,
    render_markdown,
    sample_requests,
)
from anthropic_batch.pricing import load_price_table
from tests.plugins.anthropic_batch._operator_context import (
    MODEL,
    make_context,
    prepare_run,
    ticket_records,
    use_emulator,
)


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _gate(run, **kwargs) -> SampleRefineOperator:
    return SampleRefineOperator(task_id="sample_refine", work_dir=run.work_dir, **kwargs)


def _report(run) -> dict:
    return json.loads((_local(run.work_dir) / "sample" / "report.json").read_text())


def test_gate_passes_and_projects_the_full_run(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(30), per_chunk=10)
    result = _gate(run, sample_size=8, seed=1, min_pass_rate=0.9, max_cost_usd=10.0).execute(
        make_context(task_id="sample_refine")
    )
    report = _report(run)
    assert result["passed"] and report["passed"]
    assert report["n_sampled"] == 8 and report["n_requests"] == 30
    assert report["pass_rate"] == pytest.approx(report["n_passed"] / 8) and report["pass_rate"] >= 0.9
    assert sum(report["counts_by_status"].values()) == 8
    assert sum(report["stop_reasons"].values()) == 8
    assert report["tokens"]["input"] > 0 and report["tokens"]["output"] > 0
    # Projection: mean batch cost per sampled request x all requests; sync price is double.
    assert report["projected_batch_cost_usd"] == pytest.approx(
        report["mean_batch_cost_per_request_usd"] * 30, abs=1e-6
    )
    assert report["projected_sync_cost_usd"] == pytest.approx(
        2 * report["projected_batch_cost_usd"], rel=1e-4
    )
    assert report["projected_cost_usd"] == report["projected_batch_cost_usd"]
    # The sample itself was paid at the synchronous price.
    assert report["sample_cost_usd"] == pytest.approx(report["projected_sync_cost_usd"] * 8 / 30, abs=2e-6)
    sample_dir = _local(run.work_dir) / "sample"
    assert sorted(p.name for p in sample_dir.iterdir()) == [
        "answers.jsonl",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert "PASSED" in (sample_dir / "report.md").read_text()


def test_sample_is_seeded_and_spans_chunks(tmp_path):
    run = prepare_run(tmp_path, ticket_records(40), per_chunk=10)
    manifest = Manifest.model_validate_json((_local(run.work_dir) / "requests" / "manifest.json").read_text())
    chunk_of = {r["custom_id"]: c.index for c in manifest.chunks for r in iter_chunk_requests(c.path)}
    first = [r["custom_id"] for r in sample_requests(manifest, 12, seed=5)]
    again = [r["custom_id"] for r in sample_requests(manifest, 12, seed=5)]
    other = [r["custom_id"] for r in sample_requests(manifest, 12, seed=6)]
    assert first == again and first != other
    assert len(set(first)) == 12
    assert len({chunk_of[cid] for cid in first}) >= 3
    assert len(sample_requests(manifest, 1000, seed=0)) == 40


def test_gate_fails_on_pass_rate_with_invalid_outputs(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--invalid-output-rate", "0.7", "--seed", "9")
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(20), per_chunk=10)
    with pytest.raises(AirflowFailException, match="pass rate"):
        _gate(run, sample_size=10, min_pass_rate=0.9).execute(make_context(task_id="sample_refine"))
    report = _report(run)
    assert not report["passed"] and report["pass_rate"] < 0.9
    invalid = [f for f in report["failures"] if f["status"] == "invalid_output"]
    assert invalid and all(f["reason"] for f in invalid)
    assert len(report["failures"]) == report["n_sampled"] - report["n_passed"]
    assert "FAILED" in (_local(run.work_dir) / "sample" / "report.md").read_text()


def test_gate_fails_when_the_projection_exceeds_the_budget(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(10), per_chunk=10)
    with pytest.raises(AirflowFailException, match="exceeds the budget"):
        _gate(run, sample_size=3, min_pass_rate=0.0, max_cost_usd=0.000001).execute(make_context())
    assert _report(run)["gate_failures"] == [
        f"projected cost ${_report(run)['projected_cost_usd']:,.4f} exceeds the budget $0.0000"
    ]


def test_count_tokens_projection_uses_exact_input_of_every_request(tmp_path, anthropic_conn, emulator):
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=5)
    _gate(run, sample_size=4, min_pass_rate=0.0, use_count_tokens=True).execute(make_context())
    report = _report(run)
    assert report["projection_method"] == "count_tokens_input_plus_sampled_output"
    # Independent count through the SDK over every chunk line.
    client = anthropic.Anthropic(api_key=emulator.api_key, base_url=emulator.base_url)
    manifest = json.loads((_local(run.work_dir) / "requests" / "manifest.json").read_text())
    expected_input = 0
    for chunk in manifest["chunks"]:
        for request in iter_chunk_requests(chunk["path"]):
            p = request["params"]
            expected_input += client.messages.count_tokens(
                model=p["model"], messages=p["messages"], output_config=p["output_config"]
            ).input_tokens
    assert report["input_tokens_all_requests"] == expected_input
    usage = {"input_tokens": expected_input, "output_tokens": round(report["tokens"]["output"] / 4 * 12)}
    assert report["projected_batch_cost_usd"] == pytest.approx(
        load_price_table().cost(MODEL, usage, batch=True), abs=1e-6
    )


def test_sync_mode_is_gated_on_the_synchronous_price(tmp_path, anthropic_conn):
    run = prepare_run(tmp_path, ticket_records(6), per_chunk=6, mode="sync")
    result = _gate(run, sample_size=3, min_pass_rate=0.5).execute(make_context())
    report = _report(run)
    assert report["mode"] == "sync"
    assert (
        result["projected_cost_usd"] == report["projected_sync_cost_usd"] > report["projected_batch_cost_usd"]
    )


def test_a_run_without_requests_passes_without_calls(tmp_path):
    bad = [{"ticket_id": None, "channel": "", "customer_tier": "", "subject": "", "body": "x"}]
    run = prepare_run(tmp_path, bad)
    # No connection is configured here: the gate must not need one when there is nothing to sample.
    result = _gate(run, sample_size=5).execute(make_context())
    assert result["passed"] and result["n_sampled"] == 0 and result["projected_cost_usd"] == 0


def test_reports_escape_data_and_model_text():
    report = {
        "pipeline": "<script>alert(1)</script>",
        "partition": "2026-11-01",
        "model": MODEL,
        "mode": "batch",
        "n_requests": 1,
        "seed": 0,
        "n_sampled": 1,
        "n_passed": 0,
        "pass_rate": 0.0,
        "min_pass_rate": 0.9,
        "counts_by_status": {"invalid_output": 1},
        "stop_reasons": {"end_turn": 1},
        "tokens": {"input": 1, "output": 1},
        "projected_cost_usd": 0.1,
        "projected_batch_cost_usd": 0.1,
        "projected_sync_cost_usd": 0.2,
        "projection_method": "sample_mean",
        "max_cost_usd": None,
        "sample_cost_usd": 0.2,
        "price_table_as_of": "2026-10-21",
        "passed": False,
        "gate_failures": ["pass rate 0% is below the minimum 90%"],
        "failures": [
            {
                "custom_id": "a",
                "status": "invalid_output",
                "stop_reason": "end_turn",
                "reason": 'summary: "<img src=x onerror=alert(2)>" | broken\nrow',
            }
        ],
    }
    page = render_html(report)
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    md = render_markdown(report)
    failure_line = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert failure_line.count(" | ") == 3  # the pipe and newline in the reason did not break the table


def _conn_without_sdk_retries(monkeypatch, emu) -> None:
    """The connection at ``emu`` with the SDK's retries off, so every injected fault reaches the gate."""
    conn = {
        "conn_type": "anthropic",
        "password": emu.api_key,
        "host": emu.base_url,
        "extra": {"anthropic_client_kwargs": {"max_retries": 0}},
    }
    monkeypatch.setenv("AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps(conn))


def test_transient_errors_are_retried_and_never_count_as_failed_samples(
    tmp_path, emulator_factory, monkeypatch
):
    # Most Messages calls answer 529 overloaded (seeded): with the SDK's retries off, a gate that
    # counted them as failures would fail a perfectly good prompt for good.
    emu = emulator_factory("--http-fault", "messages:529:0.7", "--seed", "3")
    _conn_without_sdk_retries(monkeypatch, emu)
    monkeypatch.setattr(sample_refine, "TRANSIENT_BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(sample_refine, "TRANSIENT_BACKOFF_CAP_S", 0.05)
    run = prepare_run(tmp_path, ticket_records(20), per_chunk=10)
    result = _gate(run, sample_size=10, min_pass_rate=1.0, transient_rounds=20).execute(make_context())
    report = _report(run)
    assert result["passed"] and report["passed"]
    assert report["n_sampled"] == 10 and report["pass_rate"] == 1.0
    assert report["counts_by_status"] == {"succeeded": 10}
    assert not [f for f in report["failures"] if f["error_type"] == "overloaded_error"]


def test_persistent_transient_errors_fail_the_task_retriably(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory("--http-fault", "messages:529:1.0")
    _conn_without_sdk_retries(monkeypatch, emu)
    monkeypatch.setattr(sample_refine, "TRANSIENT_BACKOFF_BASE_S", 0.01)
    run = prepare_run(tmp_path, ticket_records(6), per_chunk=6)
    with pytest.raises(TransientSampleError, match="failed transiently") as err:
        _gate(run, sample_size=4, min_pass_rate=0.5, transient_rounds=2).execute(make_context())
    # Not AirflowFailException: Airflow's retries apply to this one.
    assert not isinstance(err.value, AirflowFailException)
    assert "overloaded" in str(err.value)


def test_a_rerun_reuses_the_sample_answers_and_pays_nothing(tmp_path, emulator_factory, monkeypatch):
    emu = emulator_factory()
    use_emulator(monkeypatch, emu)
    run = prepare_run(tmp_path, ticket_records(12), per_chunk=6)
    first = _gate(run, sample_size=5, seed=2).execute(make_context())
    paid = _report(run)
    assert paid["n_reused_answers"] == 0 and paid["sample_cost_paid_usd"] == paid["sample_cost_usd"] > 0

    emu.stop()  # unchanged requests: the rerun must not need the API at all
    again = _gate(run, sample_size=5, seed=2).execute(make_context(try_number=2))
    report = _report(run)
    assert again["passed"] and report["n_reused_answers"] == 5
    assert report["sample_cost_paid_usd"] == 0
    # The sample's answers still cost what they cost: the run's cost includes them either way.
    assert report["sample_cost_usd"] == paid["sample_cost_usd"] == first["sample_cost_usd"]
    assert report["counts_by_status"] == paid["counts_by_status"]


def test_projection_counts_only_the_requests_that_will_be_sent():
    # 100 prepared, 90 of them answered before (answer reuse): only the 10 in chunks are paid for.
    manifest = Manifest(n_requests=100, chunks=[_chunk(0, 10)], spec={"model": "claude-haiku-4-5"})
    row = {
        "custom_id": "a",
        "status": "succeeded",
        "stop_reason": "end_turn",
        "input_tokens": 100_000,
        "output_tokens": 20_000,
        "cost_usd": 0.1,
        "sync_cost_usd": 0.2,
    }
    report = build_report(manifest, [row], sample_size=1, seed=0, min_pass_rate=0.5, max_cost_usd=None)
    # Haiku 4.5: (100k x $1 + 20k x $5) / 1M = $0.20 synchronous, $0.10 batch, per request; x 10.
    assert report["projected_batch_cost_usd"] == pytest.approx(1.0)


def _cache_rows(prefix: int, n: int) -> list[dict]:
    """n sampled answers: the first wrote the prefix, the others read it; 500 more input, 100 output."""
    return [
        {
            "custom_id": f"r{i}",
            "status": "succeeded",
            "stop_reason": "end_turn",
            "model": "claude-haiku-4-5",
            "input_tokens": 500,
            "output_tokens": 100,
            "cache_creation_input_tokens": prefix if i == 0 else 0,
            "cache_read_input_tokens": 0 if i == 0 else prefix,
        }
        for i in range(n)
    ]


def _chunk(index: int, n_requests: int) -> ChunkInfo:
    path = f"chunk-{index:05d}.jsonl"
    return ChunkInfo(index=index, path=path, n_requests=n_requests, n_bytes=0, fingerprint="")


def _cache_manifest(ttl: str, n_chunks: int = 2, cache: dict | None = None) -> Manifest:
    return Manifest(
        n_requests=40,
        chunks=[_chunk(i, 20) for i in range(n_chunks)],
        spec={"model": "claude-haiku-4-5", "cache_ttl": ttl},
        cache=cache or {"marked": True, "cacheable": True, "prefix_tokens": 4200, "minimum": 4096},
    )


def test_projection_with_and_without_caching():
    from anthropic_batch.operators.sample_refine import project_caching

    prices = load_price_table()
    rows = _cache_rows(4200, 5)
    warm = project_caching(_cache_manifest("1h"), rows, 40)
    # Without caching every request pays 4,700 input tokens; with it 500 input + 4,200 read.
    plain = prices.cost("claude-haiku-4-5", {"input_tokens": 4700 * 40, "output_tokens": 4000}, batch=True)
    cached = prices.cost(
        "claude-haiku-4-5",
        {"input_tokens": 500 * 40, "output_tokens": 4000, "cache_read_input_tokens": 4200 * 40},
        batch=True,
    )
    assert warm["without_caching"]["batch_usd"] == pytest.approx(plain, rel=1e-5)
    assert warm["with_caching"]["batch_usd"] == pytest.approx(cached, rel=1e-5)
    assert (
        warm["warmed_by_sample"] and warm["cache_writes_assumed"] == 0 and warm["prefix_source"] == "sample"
    )
    # A 5-minute cache is not assumed to survive until the batches run: one write per chunk.
    cold = project_caching(_cache_manifest("5m", n_chunks=2), rows, 40)
    assert cold["cache_writes_assumed"] == 2
    assert warm["with_caching"]["batch_usd"] < cold["with_caching"]["batch_usd"] < plain


def test_a_prefix_below_the_minimum_projects_no_saving_and_the_report_says_why():
    warning = "the prompt prefix marked for caching is about 60 tokens, below the minimum of 4,096 tokens"
    manifest = _cache_manifest(
        "1h",
        cache={"marked": True, "cacheable": False, "prefix_tokens": 60, "minimum": 4096, "warning": warning},
    )
    rows = _cache_rows(0, 5)
    report = build_report(manifest, rows, sample_size=5, seed=0, min_pass_rate=0.5, max_cost_usd=None)
    p = report["projection"]
    assert p["with_caching"] == p["without_caching"] and p["cache_writes_assumed"] == 0
    assert report["cache_warning"] == warning
    assert warning in render_markdown(report)
    assert "4,096" in render_html(report)
