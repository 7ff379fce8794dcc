"""Issue 12: prepare streams its source (never the whole table), collect reads only its chunk's keys."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import ObjectStoragePath

from anthropic_batch import batch_requests
from anthropic_batch.batch_requests import RequestSpec, iter_chunk_requests, prepare_requests, read_source
from anthropic_batch.operators.prepare import PrepareRequestsOperator
from anthropic_batch.results import ParseContext
from tests.plugins.anthropic_batch._operator_context import make_context

REPO = Path(__file__).resolve().parents[3]


def _tickets(n: int) -> pa.Table:
    return pa.table(
        {
            "ticket_id": [f"T{i:05d}" for i in range(n)],
            "channel": ["email"] * n,
            "customer_tier": ["pro"] * n,
            "subject": [f"subject {i}" for i in range(n)],
            "body": [f"body {i} " * 4 for i in range(n)],
        }
    )


def _prepare(tmp_path: Path, source: Path, **overrides) -> PrepareRequestsOperator:
    kwargs = dict(
        task_id="prepare",
        source=str(source),
        key_columns=["ticket_id"],
        prompt_template="prompts/support_ticket.j2",
        model="claude-haiku-4-5",
        max_tokens=256,
        output_model="schemas/support_ticket.py:SupportTicketExtraction",
        include_dir=str(REPO / "include"),
        work_dir=str(tmp_path / "work"),
        pipeline="tickets",
        partition="2026-11-01",
        max_requests_per_chunk=300,
    )
    return PrepareRequestsOperator(**{**kwargs, **overrides})


def test_prepare_reads_a_parquet_source_in_record_batches_never_whole(tmp_path, monkeypatch):
    n, batch_rows = 1_000, 100
    source = tmp_path / "tickets.parquet"
    table = _tickets(n)
    # Two duplicates in different row groups: the check still spans the whole source.
    ids = table.column("ticket_id").to_pylist()
    ids[950] = ids[5]
    table = table.set_column(0, "ticket_id", pa.array(ids))
    pq.write_table(table, source, row_group_size=250)
    monkeypatch.setattr(batch_requests, "SOURCE_BATCH_ROWS", batch_rows, raising=False)

    def whole(*_args, **_kwargs):
        raise AssertionError("the whole source table was read")

    # Every way of materialising a Parquet file at once is refused...
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    sizes: list[int] = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    # ... and what is read batch by batch is counted.
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    paths = _prepare(tmp_path, source).execute(make_context(task_id="prepare"))

    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["n_input_records"] == n
    assert manifest["n_requests"] == n - 2 and manifest["n_rejected"] == 2
    monkeypatch.undo()
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet").to_pylist()
    assert sorted(r["ticket_id"] for r in rejected) == [ids[5], ids[5]]
    assert {r["error_type"] for r in rejected} == {"duplicate_key"}
    assert len(paths) == 4 and sum(len(list(iter_chunk_requests(p))) for p in paths) == n - 2
    # Passes over the key columns (hash all, then confirm the candidates) and one over the records,
    # each in batches of at most batch_rows.
    assert max(sizes) <= batch_rows
    assert sum(sizes) == 3 * n and len(sizes) >= 3 * n // batch_rows


def test_a_jsonl_source_streams_in_batches_with_one_type_per_column(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_requests, "SOURCE_BATCH_ROWS", 2)
    path = tmp_path / "in.jsonl"
    records = [
        {"ticket_id": "A", "v": 7},
        {"ticket_id": "B", "v": 8},
        b"{broken",
        {"ticket_id": "C", "v": "seven"},
        {"ticket_id": "A", "v": 9, "extra": "x"},
        {"ticket_id": "D", "v": None},
    ]
    path.write_bytes(
        b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records) + b"\n"
    )
    table, unreadable = read_source(str(path))
    # Blocks of two: ints first, text later; the whole column is text, as if read at once.
    assert table.column("v").to_pylist() == ["7", "8", "seven", "9", None]
    assert table.column("extra").to_pylist() == [None, None, None, "x", None]
    assert [u.line for u in unreadable] == [3]

    work = ObjectStoragePath((tmp_path / "work").as_uri())
    reader = batch_requests.SourceReader(str(path))
    spec = RequestSpec(model="claude-haiku-4-5", max_tokens=10, prompt_template="{{ v }} {{ extra }}")
    manifest = prepare_requests(reader, ["ticket_id"], spec, work)
    assert manifest.n_input_records == 6 and manifest.n_requests == 2
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet").to_pylist()
    # A key repeated across batches rejects both records; the unreadable line is there with its line.
    assert sorted((r["ticket_id"] or "", r["error_type"]) for r in rejected) == [
        ("", "unreadable_record"),
        ("A", "duplicate_key"),
        ("A", "duplicate_key"),
        ("D", "empty_prompt"),
    ]


def test_collect_reads_only_the_keys_of_its_chunk(tmp_path, monkeypatch):
    work = ObjectStoragePath((tmp_path / "work").as_uri())
    spec = RequestSpec(model="claude-haiku-4-5", max_tokens=10, prompt_template="{{ subject }}")
    manifest = prepare_requests(_tickets(35), ["ticket_id"], spec, work, max_requests_per_chunk=10)
    assert [c.n_requests for c in manifest.chunks] == [10, 10, 10, 5]
    rows_read: list[int] = []

    def spy(name: str):
        real = getattr(pq.ParquetFile, name)

        def read(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            rows_read.append(result.num_rows)
            return result

        monkeypatch.setattr(pq.ParquetFile, name, read)

    for name in ("read", "read_row_groups", "read_row_group"):
        spy(name)
    ctx = ParseContext.from_work_dir(work, batch_id="b", attempt=1, chunk_indices=[2], manifest=manifest)
    assert {cid.split("-")[0] for cid in ctx.keys} == {f"T{i:05d}" for i in range(20, 30)}
    assert sum(rows_read) == 10  # the chunk's 10 keys, not the day's 35
    monkeypatch.undo()
    keys_file = tmp_path / "work" / "requests" / "keys.parquet"
    meta = pq.ParquetFile(keys_file).metadata
    at = meta.schema.to_arrow_schema().get_field_index("chunk_index")
    for g in range(meta.num_row_groups):  # the layout: no row group spans two chunks
        stats = meta.row_group(g).column(at).statistics
        assert stats.min == stats.max


@pytest.mark.parametrize("chunks", [[0, 3], []])
def test_read_keys_of_several_or_no_chunks(tmp_path, chunks):
    work = ObjectStoragePath((tmp_path / "work").as_uri())
    spec = RequestSpec(model="claude-haiku-4-5", max_tokens=10, prompt_template="{{ subject }}")
    prepare_requests(_tickets(35), ["ticket_id"], spec, work, max_requests_per_chunk=10)
    keys = batch_requests.read_keys(work, chunks)
    assert sorted(set(keys.column("chunk_index").to_pylist())) == chunks
    assert keys.num_rows == sum(10 if c < 3 else 5 for c in chunks)


def test_a_rerun_with_nothing_to_reuse_reads_only_the_fingerprints_of_the_keys(tmp_path, monkeypatch):
    from anthropic_batch import storage

    source = tmp_path / "tickets.parquet"
    pq.write_table(_tickets(50), source)
    _prepare(tmp_path, source).execute(make_context(task_id="prepare"))
    reads: list[list[str] | None] = []
    real = storage.read_parquet

    def spy(path, columns=None, **kwargs):
        if str(path).endswith("keys.parquet"):
            reads.append(columns)
        return real(path, columns, **kwargs)

    monkeypatch.setattr(storage, "read_parquet", spy)
    # The rerun finds the (empty) reused-answers file of the first run, but no answer in it.
    _prepare(tmp_path, source).execute(make_context(task_id="prepare"))
    assert reads == [["request_fingerprint"]]
