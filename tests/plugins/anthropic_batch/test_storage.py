"""Storage: root resolution, layout, atomic writes and Parquet round trips on file:// paths."""

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
