"""layout.py is the one place that builds and parses the paths of a run."""

import json

import jinja2
import pytest

from anthropic_batch import layout, storage
from anthropic_batch.contracts import Manifest


@pytest.fixture
def root(tmp_path):
    return storage.as_path(tmp_path / "root")


def test_work_dir_round_trips(root):
    work = layout.work_dir(root, "tickets", "2026-11-30")
    parts = layout.parse_work_dir(work)
    assert parts is not None
    assert (str(parts.root), parts.pipeline, parts.partition) == (str(root), "tickets", "2026-11-30")
    assert layout.parse_work_dir(root / "tickets" / "elsewhere") is None


@pytest.mark.parametrize("attempt", [1, 2, 9, 10, 42])
def test_attempt_dir_round_trips(root, attempt):
    work = layout.work_dir(root, "tickets", "2026-11-30")
    directory = layout.attempt_dir(work, attempt)
    assert layout.parse_attempt_dir(directory.name) == attempt
    assert layout.results_file(work, attempt, "msgbatch_1").parent == directory
    assert layout.parse_attempt_dir("attempt-xx") is None
    assert layout.parse_attempt_dir("merged.parquet") is None


def test_ledger_entry_round_trips(root):
    path = layout.ledger_entry_path(layout.ledger_root(root), "dag", "2026-11-30", "submit", "fp123")
    rel = str(path).removeprefix(str(root) + "/")
    assert rel == "_ledger/dag/2026-11-30/submit/fp123.json"
    assert layout.parse_ledger_entry(rel) == ("dag", "2026-11-30", "submit", "fp123")
    assert layout.parse_ledger_entry("_ledger/dag/2026-11-30/submit/.fp123.json.tmp-abc") is None
    assert layout.parse_ledger_entry("_ledger/dag/2026-11-30/fp123.json") is None
    # The glob of ledger.iter_entries finds the entry under the ledger root.
    storage.atomic_write_bytes(path, b"{}")
    base = layout.ledger_root(root)
    assert [str(p) for p in base.glob(layout.ledger_glob("dag", "2026-11-30"))] == [str(path)]
    assert [str(p) for p in base.glob(layout.ledger_glob())] == [str(path)]
    assert list(base.glob(layout.ledger_glob("other"))) == []


def test_work_dir_files(root):
    work = layout.work_dir(root, "tickets", "2026-11-30")
    assert str(layout.manifest_path(work)) == f"{work}/requests/manifest.json"
    assert str(layout.keys_path(work)) == f"{work}/requests/keys.parquet"
    assert str(layout.keys_file(work)) == layout.keys_path(work).path  # local: a plain path
    assert str(layout.retry_dir(work, 2) / layout.retry_chunk_name(2, 3)) == (
        f"{work}/requests/retry-02/retry-02-chunk-00003.jsonl"
    )
    chunk = layout.requests_dir(work) / layout.chunk_name(7)
    assert str(layout.sync_results_path(chunk)) == f"{work}/sync/chunk-00007.results.jsonl"
    assert str(layout.merge_record_path(layout.merged_path(work))) == f"{work}/results/merged.json"
    assert str(layout.resubmit_state_path(work)) == f"{work}/results/resubmit-state.json"


def test_templates_render_to_the_same_paths_as_the_functions(root):
    root_url = str(root)
    template = layout.work_dir_template(
        layout.storage_root_template(None), "tickets", layout.PARTITION_TEMPLATE
    )
    env = {"batch_storage_root": lambda override: root_url, "batch_partition": lambda: "2026-11-30"}
    rendered = jinja2.Template(template).render(**env)
    assert rendered == str(layout.work_dir(root, "tickets", "2026-11-30"))
    template = layout.extraction_dir_template(
        layout.storage_root_template("s3://b/p"), "tickets", layout.PARTITION_TEMPLATE
    )
    assert "batch_storage_root('s3://b/p')" in template
    rendered = jinja2.Template(template).render(**env)
    assert rendered == str(layout.extraction_dir(root, "tickets", "2026-11-30"))


def test_attempt_result_files_order_and_filter(root):
    work = layout.work_dir(root, "tickets", "2026-11-30")
    for attempt, name in [(1, "b.parquet"), (1, "a.parquet"), (2, "c.parquet"), (2, ".c.parquet.tmp-x")]:
        storage.atomic_write_bytes(layout.attempt_dir(work, attempt) / name, b"x")
    storage.atomic_write_bytes(layout.merged_path(work), b"x")
    names = [(p.parent.name, p.name) for p in layout.attempt_result_files(work)]
    assert names == [("attempt-01", "a.parquet"), ("attempt-01", "b.parquet"), ("attempt-02", "c.parquet")]
    newest = [(p.parent.name, p.name) for p in layout.attempt_result_files(work, newest_first=True)]
    assert newest == [("attempt-02", "c.parquet"), ("attempt-01", "a.parquet"), ("attempt-01", "b.parquet")]
    assert layout.attempt_result_files(layout.work_dir(root, "other", "2026-11-30")) == []


def test_read_manifest_names_the_missing_file(root, tmp_path):
    work = layout.work_dir(root, "tickets", "2026-11-30")
    with pytest.raises(FileNotFoundError, match=r"requests/manifest\.json"):
        layout.read_manifest(work)
    storage.atomic_write_bytes(layout.manifest_path(work), json.dumps({"chunks": []}).encode())
    assert layout.read_manifest(work) == Manifest(chunks=[])
    assert layout.read_manifest(layout.manifest_path(work).parent.parent.path) == Manifest(chunks=[])
