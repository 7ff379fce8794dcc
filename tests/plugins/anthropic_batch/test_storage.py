"""Storage: root resolution, layout, atomic writes and Parquet round trips on file:// paths."""

import json

import pyarrow as pa
import pytest
from airflow.sdk import ObjectStoragePath

from anthropic_batch import storage


@pytest.fixture
def root(tmp_path):
    return ObjectStoragePath(tmp_path.as_uri())


def test_as_path_accepts_urls_plain_paths_and_objects(tmp_path):
    p = storage.as_path(str(tmp_path / "a.txt"))
    assert isinstance(p, ObjectStoragePath)
    assert str(p) == (tmp_path / "a.txt").as_uri()
    assert storage.as_path(p) is p
    assert str(storage.as_path("file:///x/y")) == "file:///x/y"


def test_storage_root_order(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV, raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_ANTHROPIC_BATCH_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))
    assert str(storage.storage_root()) == (tmp_path / "home" / "anthropic_batch_data").as_uri()
    monkeypatch.setenv("AIRFLOW_VAR_ANTHROPIC_BATCH_STORAGE_ROOT", "file:///from/variable")
    assert str(storage.storage_root()) == "file:///from/variable"
    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, "file:///from/env")
    assert str(storage.storage_root()) == "file:///from/env"
    assert str(storage.storage_root("file:///from/override")) == "file:///from/override"


def test_layout(root):
    base = str(root)
    assert str(storage.work_dir(root, "tickets", "2026-11-01")) == f"{base}/tickets/work/date=2026-11-01"
    assert (
        str(storage.extraction_dir(base, "tickets", "2026-11-01"))
        == f"{base}/tickets/extractions/date=2026-11-01"
    )
    assert str(storage.report_dir(root, "2026-11-01")) == f"{base}/reports/date=2026-11-01"
    assert str(storage.ledger_root(root)) == f"{base}/_ledger"


def test_atomic_write_creates_dirs_and_overwrites(root, tmp_path):
    target = root / "deep" / "dir" / "f.bin"
    storage.atomic_write_bytes(target, b"one")
    storage.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "deep" / "dir").iterdir()] == ["f.bin"]


def test_atomic_writer_leaves_nothing_on_error(root, tmp_path):
    target = root / "f.bin"
    storage.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), storage.open_atomic_writer(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_json_round_trip_and_default(root):
    target = root / "x" / "m.json"
    assert storage.read_json(target) is None
    assert storage.read_json(target, default={}) == {}
    storage.atomic_write_json(target, {"b": 1, "a": ["ü"]})
    assert storage.read_json(target) == {"b": 1, "a": ["ü"]}
    assert "ü" in target.read_text(encoding="utf-8")


def test_parquet_table_and_batches(root, tmp_path):
    schema = pa.schema([("k", pa.string()), ("n", pa.int64())])
    table = pa.table({"k": ["a", "b"], "n": [1, 2]}, schema=schema)
    storage.write_parquet_atomic(root / "t.parquet", table, schema)
    assert storage.read_parquet(root / "t.parquet").equals(table)

    def batches():
        for i in range(3):
            yield pa.record_batch({"n": [i], "k": [str(i)]})  # columns in another order: reordered

    storage.write_parquet_atomic(root / "b.parquet", batches(), schema)
    got = storage.read_parquet(str(tmp_path / "b.parquet"))
    assert got.schema == schema
    assert got.column("n").to_pylist() == [0, 1, 2]

    storage.write_parquet_atomic(root / "empty.parquet", iter(()), schema)
    assert storage.read_parquet(root / "empty.parquet").num_rows == 0


def test_parquet_error_midstream_keeps_old_file(root, tmp_path):
    schema = pa.schema([("n", pa.int64())])
    storage.write_parquet_atomic(root / "t.parquet", pa.table({"n": [7]}), schema)

    def failing():
        yield pa.record_batch({"n": [1]})
        raise ValueError("source broke")

    with pytest.raises(ValueError):
        storage.write_parquet_atomic(root / "t.parquet", failing(), schema)
    assert storage.read_parquet(root / "t.parquet").column("n").to_pylist() == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def test_open_binary_local_and_is_local(root, tmp_path):
    target = root / "f.bin"
    storage.atomic_write_bytes(target, b"abc")
    assert storage.is_local(target)
    assert not storage.is_local(ObjectStoragePath("s3://bucket/key", conn_id="aws_default"))
    with storage.open_binary(target) as handle:
        assert handle.read() == b"abc"
    with storage.open_binary(str(tmp_path / "f.bin")) as handle:
        assert handle.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        storage.open_binary(root / "missing.bin")


def test_as_path_keeps_hive_partition_names(tmp_path):
    p = storage.as_path(str(tmp_path / "work" / "date=2026-11-01"))
    assert str(p).endswith("/work/date=2026-11-01")
    storage.atomic_write_bytes(p / "x.bin", b"1")
    assert (tmp_path / "work" / "date=2026-11-01" / "x.bin").read_bytes() == b"1"


# -- conditional writes ----------------------------------------------------------------------------
def _claim_in_child(path: str, marker: bytes, start: float, out) -> None:
    import time as _time

    while _time.time() < start:  # all children try at (about) the same instant
        pass
    out.put(storage.create_if_absent(path, marker))


def _increment_in_child(path: str, times: int) -> None:
    import json as _json

    for _ in range(times):
        while True:
            data, version = storage.read_with_version(path)
            value = _json.loads(data)["n"] + 1
            if storage.replace_if_version(path, _json.dumps({"n": value}).encode(), version):
                break


def test_create_if_absent_has_exactly_one_winner_across_processes(tmp_path):
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    target = str(tmp_path / "claims" / "entry.json")
    (tmp_path / "claims").mkdir()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_claim_in_child, args=(target, b"p%d" % i, start, out)) for i in range(6)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert sorted(results) == [False] * 5 + [True]
    content = (tmp_path / "claims" / "entry.json").read_bytes()
    assert content in {b"p%d" % i for i in range(6)}  # one complete file, never a torn one
    assert [p.name for p in (tmp_path / "claims").iterdir()] == ["entry.json"]  # no temp files left


def test_create_if_absent_has_exactly_one_winner_across_threads(tmp_path):
    import threading

    target = str(tmp_path / "entry.json")
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def claim(i: int) -> None:
        barrier.wait()
        results.append(storage.create_if_absent(target, b"t%d" % i))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_replace_if_version_is_a_compare_and_swap(tmp_path):
    target = str(tmp_path / "e.json")
    assert storage.read_with_version(target) is None
    assert not storage.replace_if_version(target, b"x", "sha256:none")  # absent: nothing to replace
    assert storage.create_if_absent(target, b"one")
    data, version = storage.read_with_version(target)
    assert data == b"one"
    assert storage.replace_if_version(target, b"two", version)
    assert not storage.replace_if_version(target, b"three", version)  # stale version
    assert storage.read_with_version(target)[0] == b"two"


def test_replace_if_version_loses_no_update_across_processes(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    target = str(tmp_path / "counter.json")
    storage.create_if_absent(target, b'{"n": 0}')
    procs = [ctx.Process(target=_increment_in_child, args=(target, 25)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert json.loads(storage.read_with_version(target)[0]) == {"n": 100}


def test_conditional_writes_elsewhere_go_to_object_store(monkeypatch):
    from anthropic_batch import object_store

    calls = []
    for name in ("create_if_absent", "read_with_version", "replace_if_version"):
        monkeypatch.setattr(object_store, name, lambda *args, name=name: calls.append((name, *args)))
    path = ObjectStoragePath("memory://bucket/_ledger/e.json")
    storage.create_if_absent(path, b"x")
    storage.read_with_version(str(path))
    storage.replace_if_version(path, b"y", "v1")
    assert [(c[0], str(c[1]), *c[2:]) for c in calls] == [
        ("create_if_absent", str(path), b"x"),
        ("read_with_version", str(path)),
        ("replace_if_version", str(path), b"y", "v1"),
    ]
