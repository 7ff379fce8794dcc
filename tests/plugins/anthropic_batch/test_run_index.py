"""The Batches page's index: correct when missing, stale, corrupt or forged; reads only what changed."""

from __future__ import annotations

import json

import pytest

from anthropic_batch import run_index, storage
from anthropic_batch.ledger import SubmissionLedger


def entry(dag: str, day: str, n: int, **extra) -> dict:
    return {
        "dag_id": dag,
        "partition": day,
        "batch_id": f"msgbatch_{dag}_{day}_{n}",
        "n_requests": n,
        **extra,
    }


def write_entry(root, dag: str, day: str, n: int, **extra):
    path = root / "_ledger" / dag / day / "batch.submit" / f"fp{n}.json"
    storage.atomic_write_json(path, entry(dag, day, n, **extra))
    return path


def write_summary(root, pipeline: str, day: str, **extra):
    path = root / pipeline / "extractions" / f"date={day}" / "summary.json"
    storage.atomic_write_json(path, {"dag_id": pipeline, "n_rows": 1, **extra})
    return path


@pytest.fixture
def root(tmp_path):
    root = storage.as_path(str(tmp_path / "store"))
    for n in range(1, 6):
        write_entry(root, "dag_a", f"2026-11-0{n}", n)
    write_entry(root, "dag_b", "2026-11-01", 9)
    write_summary(root, "pipe", "2026-11-01")
    write_summary(root, "pipe", "2026-11-02", cost_usd=1.5)
    # Not ledger entries or summaries: a temporary file, a work dir, a deeper file.
    storage.atomic_write_bytes(
        root / "_ledger" / "dag_a" / "2026-11-01" / "batch.submit" / ".x.json.tmp-1", b"{"
    )
    storage.atomic_write_bytes(root / "pipe" / "work" / "date=2026-11-01" / "summary.json", b"{}")
    return root


@pytest.fixture
def reads(monkeypatch):
    """The keys each sync actually read (everything else came from the index)."""
    seen: list[list[str]] = []
    original = run_index._read_all

    def spy(root, rel_paths, read):
        seen.append(list(rel_paths))
        return original(root, rel_paths, read)

    monkeypatch.setattr(run_index, "_read_all", spy)
    return seen


def by_batch(entries):
    return {e["batch_id"]: e for e in entries}


def test_entries_match_the_ledger_and_the_index_is_then_used(root, reads):
    expected = list(SubmissionLedger(root).iter_entries())
    assert by_batch(run_index.ledger_entries(root)) == by_batch(expected)
    assert len(reads[-1]) == 6  # no index yet: every entry read once
    assert (root / "_index" / "ledger.json").exists()
    assert by_batch(run_index.ledger_entries(root)) == by_batch(expected)
    assert reads[-1] == []  # nothing changed: nothing read
    assert [
        e["batch_id"] for e in run_index.ledger_entries(root, dag_id="dag_a", partition="2026-11-03")
    ] == ["msgbatch_dag_a_2026-11-03_3"]


def test_changed_new_and_deleted_entries_are_seen(root, reads):
    run_index.ledger_entries(root)
    changed = write_entry(root, "dag_a", "2026-11-02", 2, state="ended", cost_usd=0.5)
    write_entry(root, "dag_c", "2026-11-09", 7)
    (root / "_ledger" / "dag_b" / "2026-11-01" / "batch.submit" / "fp9.json").unlink()
    entries = by_batch(run_index.ledger_entries(root))
    assert sorted(reads[-1]) == sorted(
        [str(changed)[len(str(root)) + 1 :], "_ledger/dag_c/2026-11-09/batch.submit/fp7.json"]
    )
    assert entries["msgbatch_dag_a_2026-11-02_2"]["cost_usd"] == 0.5
    assert "msgbatch_dag_c_2026-11-09_7" in entries
    assert "msgbatch_dag_b_2026-11-01_9" not in entries


def test_a_corrupt_or_foreign_index_is_rebuilt(root, reads):
    storage.atomic_write_bytes(root / "_index" / "ledger.json", b"not json")
    assert len(run_index.ledger_entries(root)) == 6
    storage.atomic_write_json(root / "_index" / "ledger.json", {"version": 99, "files": {}})
    assert len(run_index.ledger_entries(root)) == 6
    assert len(reads[-1]) == 6


def test_a_forged_index_entry_with_an_old_signature_is_not_trusted(root):
    run_index.ledger_entries(root)
    index_path = root / "_index" / "ledger.json"
    index = json.loads(index_path.read_bytes())
    rel = "_ledger/dag_a/2026-11-01/batch.submit/fp1.json"
    index["files"][rel]["content"]["n_requests"] = 12345
    index["files"][rel]["sig"] = "0:stale:0"
    storage.atomic_write_json(index_path, index)
    assert by_batch(run_index.ledger_entries(root))["msgbatch_dag_a_2026-11-01_1"]["n_requests"] == 1


def test_summaries_are_indexed_by_partition(root, reads):
    found = run_index.summaries(root)
    assert sorted(s.partition for s in found) == ["2026-11-01", "2026-11-02"]
    assert all(s.pipeline == "pipe" for s in found)
    assert run_index.summaries(root) == found and reads[-1] == []
    write_summary(root, "pipe", "2026-11-02", cost_usd=2.5)
    again = {s.partition: s for s in run_index.summaries(root)}
    assert reads[-1] == ["pipe/extractions/date=2026-11-02"]
    assert again["2026-11-02"].cost_usd == 2.5
    assert [s.partition for s in run_index.summaries(root, partition="2026-11-01")] == ["2026-11-01"]


def test_an_unwritable_index_still_gives_correct_results(root, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only store")

    monkeypatch.setattr(run_index.storage, "atomic_write_bytes", refuse)
    assert len(run_index.ledger_entries(root)) == 6
    assert len(run_index.summaries(root)) == 2
    run_index.refresh(root)  # never raises


def test_an_empty_root(tmp_path):
    root = storage.as_path(str(tmp_path / "nothing"))
    assert run_index.ledger_entries(root) == []
    assert run_index.summaries(root) == []


@pytest.fixture
def s3_root():
    """A root on a moto S3 server on 127.0.0.1 (every read a real HTTP request)."""
    import logging

    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from airflow.sdk import ObjectStoragePath
    from airflow.sdk.io import attach

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = s3fs.S3FileSystem(
            key="test",
            secret="test",
            endpoint_url=f"http://{host}:{port}",
            client_kwargs={"region_name": "us-east-1"},
        )
        fs.call_s3("create_bucket", Bucket="index-test")
        attach("s3", "moto_index_test", fs=fs)
        yield ObjectStoragePath("s3://moto_index_test@index-test/root")
    finally:
        server.stop()


def test_the_index_on_an_object_store(s3_root, reads):
    root = s3_root
    for n in range(1, 4):
        write_entry(root, "dag_a", f"2026-11-0{n}", n)
    write_summary(root, "pipe", "2026-11-01")
    assert len(run_index.ledger_entries(root)) == 3 and len(reads[-1]) == 3
    assert len(run_index.summaries(root)) == 1
    assert len(run_index.ledger_entries(root)) == 3 and reads[-1] == []
    write_entry(root, "dag_a", "2026-11-02", 2, cost_usd=4.0)  # same size class, new ETag
    entries = by_batch(run_index.ledger_entries(root))
    assert reads[-1] == ["_ledger/dag_a/2026-11-02/batch.submit/fp2.json"]
    assert entries["msgbatch_dag_a_2026-11-02_2"]["cost_usd"] == 4.0
    assert entries["msgbatch_dag_a_2026-11-02_2"]["ledger_path"].startswith("s3://")


def test_summaries_follow_a_partition_commit_file(tmp_path, monkeypatch, reads):
    """Publish writes ``_gen=<id>/summary.json`` and then ``_COMMIT.json`` naming it: a new commit
    makes the partition stale, and the summary is read through the partition module's reader."""
    root = storage.as_path(str(tmp_path / "store"))
    part = root / "pipe" / "extractions" / "date=2026-11-01"

    def publish(generation: str, cost: float) -> None:
        summary = f"_gen={generation}/summary.json"
        storage.atomic_write_json(part / summary, {"dag_id": "pipe", "cost_usd": cost})
        commit = {"generation": generation, "files": {"summary.json": {"path": summary, "size": None}}}
        storage.atomic_write_json(part / "_COMMIT.json", commit)

    publish("g1", 1.0)
    assert [s.cost_usd for s in run_index.summaries(root)] == [1.0]
    assert run_index.summaries(root)[0].partition == "2026-11-01" and reads[-1] == []
    publish("g2", 2.0)
    assert [s.cost_usd for s in run_index.summaries(root)] == [2.0]
    assert reads[-1] == ["pipe/extractions/date=2026-11-01"]


def test_ledger_entries_are_indexed_validated(root, caplog):
    """A bad entry is skipped with the file and field named; an old sync entry reads as a sync run."""
    write_entry(root, "dag_c", "2026-11-01", 1, n_requests="many")
    old_sync = write_entry(root, "dag_c", "2026-11-01", 2, mode="sync", batch_id="sync_abc")
    with caplog.at_level("WARNING"):
        found = run_index.ledger_entries(root, dag_id="dag_c")
    assert [e["sync_run_id"] for e in found] == ["sync_abc"] and found[0]["batch_id"] is None
    assert any("fp1.json" in r.getMessage() and "n_requests" in r.getMessage() for r in caplog.records)
    assert str(old_sync).endswith("fp2.json")
