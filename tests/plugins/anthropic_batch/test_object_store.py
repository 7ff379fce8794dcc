"""Object-store native storage against a real S3 server (moto on 127.0.0.1) and local files:
conditional create/replace under concurrency, single-PUT writes, parts, and the storage-root rules."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pyarrow as pa
import pytest

from anthropic_batch import object_store, storage


@pytest.fixture(params=["s3", "memory"])
def any_root(request, tmp_path) -> str:
    # Local files are storage.py's own (tests/plugins/anthropic_batch/test_storage.py).
    if request.param == "s3":
        return request.getfixturevalue("s3_root")
    return f"memory://{tmp_path.name}/root"


def _race(n: int, action: Callable[[int], bool]) -> list[bool]:
    """Run ``action(i)`` in ``n`` threads released together; their results in order."""
    barrier = threading.Barrier(n)
    results: list[bool | BaseException] = [False] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = action(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    return results  # type: ignore[return-value]


def test_concurrent_creators_exactly_one_wins(any_root):
    for round_ in range(5):
        path = storage.as_path(f"{any_root}/_ledger/entry-{round_}.json")
        results = _race(8, lambda i, path=path: object_store.create_if_absent(path, f"writer {i}".encode()))
        assert results.count(True) == 1, results
        data, _ = object_store.read_with_version(path)
        assert data == f"writer {results.index(True)}".encode()  # the winner's bytes, whole


def test_stale_version_is_refused(any_root):
    path = storage.as_path(f"{any_root}/entry.json")
    assert object_store.read_with_version(path) is None
    assert object_store.replace_if_version(path, b"x", "no-such-version") is False  # absent
    assert object_store.create_if_absent(path, b"intent") is True
    assert object_store.create_if_absent(path, b"other") is False
    data, v1 = object_store.read_with_version(path)
    assert data == b"intent"
    assert object_store.replace_if_version(path, b"submitted", v1) is True
    assert object_store.replace_if_version(path, b"lost update", v1) is False  # v1 is stale now
    data, v2 = object_store.read_with_version(path)
    assert (data, v2 != v1) == (b"submitted", True)


def test_concurrent_replacers_exactly_one_wins(any_root):
    path = storage.as_path(f"{any_root}/entry.json")
    object_store.create_if_absent(path, b"v0")
    _, version = object_store.read_with_version(path)
    results = _race(6, lambda i: object_store.replace_if_version(path, f"v1 by {i}".encode(), version))
    assert results.count(True) == 1, results
    assert object_store.read_with_version(path)[0] == f"v1 by {results.index(True)}".encode()


def _s3_operations(path) -> list[str]:
    """Every S3 API operation the path's filesystem makes from now on (botocore's event hooks)."""
    calls: list[str] = []
    path.fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    return calls


def test_object_store_write_is_one_put_without_temporary_object(s3_root):
    target = storage.as_path(f"{s3_root}/extractions/date=2026-11-01/summary.json")
    calls = _s3_operations(target)
    storage.atomic_write_json(target, {"n": 1})
    assert calls == ["PutObject"]
    del calls[:]
    schema = pa.schema([("k", pa.string())])
    storage.write_parquet_atomic(target.parent / "data.parquet", pa.table({"k": ["a"]}, schema=schema))
    assert calls == ["PutObject"]  # streamed writes too: no temporary object, no CopyObject
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.parquet", "summary.json"]
    assert storage.read_json(target) == {"n": 1}


def test_object_store_writer_uploads_nothing_on_error(s3_root):
    target = storage.as_path(f"{s3_root}/f.bin")
    storage.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), storage.open_atomic_writer(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_parts_survive_their_writer(any_root):
    directory = f"{any_root}/work/date=2026-11-01/sync/chunk-00000.parts"
    assert list(storage.iter_parts(directory)) == []
    storage.write_part(directory, 1, b'{"custom_id": "b"}\n')
    storage.write_part(directory, 0, b'{"custom_id": "a"}\n')
    # A crash between parts loses nothing written: each part is visible as soon as it is written.
    storage.write_part(directory, 1, b'{"custom_id": "b"}\n')  # a redone step replaces its part
    assert list(storage.iter_parts(directory)) == [(0, b'{"custom_id": "a"}\n'), (1, b'{"custom_id": "b"}\n')]
    with pytest.raises(ValueError, match="part number"):
        storage.write_part(directory, -1, b"")


def test_local_root_with_a_distributed_executor_fails_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    monkeypatch.delenv(storage.SHARED_LOCAL_ROOT_ENV, raising=False)
    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=f"env {storage.STORAGE_ROOT_ENV}.*CeleryExecutor"):
        storage.storage_root()
    monkeypatch.delenv(storage.STORAGE_ROOT_ENV)
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor,airflow.providers.cncf.kubernetes.executors."
                       "kubernetes_executor.KubernetesExecutor")  # fmt: skip
    with pytest.raises(ValueError, match=r"the default root.*KubernetesExecutor"):
        storage.storage_root()
    monkeypatch.setenv(storage.SHARED_LOCAL_ROOT_ENV, "true")  # one volume mounted by every worker
    assert storage.storage_root(str(tmp_path)).path == str(tmp_path)


def test_object_store_root_with_a_distributed_executor_is_fine(monkeypatch, s3_root):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    assert str(storage.storage_root(s3_root)) == s3_root


def test_local_executor_keeps_a_local_root(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.setenv(storage.STORAGE_ROOT_ENV, str(tmp_path))
    assert storage.storage_root().path == str(tmp_path)
