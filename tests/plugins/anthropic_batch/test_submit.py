"""SubmitBatchOperator: manifest-driven, idempotent across retries, pushes the batch id at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anthropic_batch.contracts import ChunkInfo, Manifest
from anthropic_batch.layout import read_manifest
from anthropic_batch.links import BATCH_ID_XCOM_KEY, AnthropicConsoleBatchLink
from anthropic_batch.operators.submit import SubmitBatchOperator
from anthropic_batch.submission import find_chunk, projected_cost_usd
from tests.plugins.anthropic_batch._operator_context import make_context
from tests.plugins.anthropic_batch.test_hooks import MODEL, make_chunk, sdk_client, use_emulator


def write_manifest(work: Path, chunks: list[dict], mode: str = "batch") -> None:
    manifest = {
        "chunks": chunks,
        "n_requests": sum(c["n_requests"] for c in chunks),
        "n_rejected": 0,
        "n_input_records": sum(c["n_requests"] for c in chunks),
        "spec": {"pipeline": "pipe", "partition": "2026-11-01", "model": MODEL, "max_tokens": 32},
        "mode": mode,
    }
    (work / "requests" / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def emu(emulator_factory, monkeypatch):
    emu = emulator_factory("--processing-seconds", "1")
    emu.conn_id = use_emulator(monkeypatch, emu, "submit_emu")
    return emu


def operator(work: Path, chunk: dict, root: Path, conn_id: str) -> SubmitBatchOperator:
    return SubmitBatchOperator(
        task_id="submit",
        chunk_path=chunk["path"],
        work_dir=str(work),
        storage_root=str(root),
        conn_id=conn_id,
    )


def test_submit_is_idempotent_across_retries(emu, tmp_path):
    work, root = tmp_path / "work", tmp_path / "root"
    chunks = [make_chunk(work, 4, index=0), make_chunk(work, 5, index=1, prefix="s")]
    write_manifest(work, chunks)

    context = make_context(task_id="submit", map_index=1)
    handle = operator(work, chunks[1], root, emu.conn_id).execute(context)
    assert handle["n_requests"] == 5 and handle["mode"] == "batch" and handle["attempt"] == 1
    assert context["ti"].xcoms[BATCH_ID_XCOM_KEY] == handle["batch_id"]
    entry = json.loads(Path(handle["ledger_path"].removeprefix("file://")).read_text())
    assert entry["map_index"] == 1 and entry["partition"] == "2026-11-01" and entry["pipeline"] == "pipe"
    assert entry["projected_cost_usd"] > 0

    retry = make_context(task_id="submit", map_index=1, try_number=2)
    assert operator(work, chunks[1], root, emu.conn_id).execute(retry) == handle
    batches = list(sdk_client(emu).messages.batches.list(limit=100))
    assert [b.id for b in batches] == [handle["batch_id"]]


def test_sync_mode_from_manifest(emu, tmp_path):
    work, root = tmp_path / "work", tmp_path / "root"
    chunk = make_chunk(work, 3)
    write_manifest(work, [chunk], mode="sync")
    handle = operator(work, chunk, root, emu.conn_id).execute(make_context(task_id="submit"))
    assert handle["mode"] == "sync" and handle["sync_run_id"].startswith("sync_")
    assert handle["batch_id"] is None
    assert handle["results_path"].endswith("sync/chunk-00000.results.jsonl")
    assert list(sdk_client(emu).messages.batches.list()) == []


def test_missing_manifest_and_unknown_chunk(tmp_path):
    work = tmp_path / "work"
    chunk = make_chunk(work, 1)
    op = operator(work, chunk, tmp_path / "root", "unused")
    with pytest.raises(FileNotFoundError, match="prepare"):
        op.execute(make_context(task_id="submit"))
    write_manifest(work, [chunk])
    with pytest.raises(ValueError, match="not in the manifest"):
        find_chunk(read_manifest(work), "file:///else/chunk-00009.jsonl")


def test_find_chunk_matches_a_plain_path_against_a_url(tmp_path):
    chunk = make_chunk(tmp_path, 1)
    plain = chunk["path"].removeprefix("file://")
    manifest = Manifest.model_validate({"chunks": [chunk]})
    assert find_chunk(manifest, plain) == ChunkInfo.model_validate(chunk)


def test_projected_cost():
    cost = projected_cost_usd(MODEL, n_requests=1000, n_bytes=400_000, max_tokens=100)
    # haiku-4-5 batch: 100k input tokens at 0.5/M + 100k output tokens at 2.5/M
    assert cost == pytest.approx(0.05 + 0.25)
    assert projected_cost_usd("no-such-model", 1, 1, 1) is None


def test_declares_templates_and_console_link():
    assert set(SubmitBatchOperator.template_fields) == {"chunk_path", "work_dir", "storage_root"}
    assert any(
        isinstance(link, AnthropicConsoleBatchLink) for link in SubmitBatchOperator.operator_extra_links
    )
