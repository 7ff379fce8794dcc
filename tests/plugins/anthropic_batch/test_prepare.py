"""PrepareRequestsOperator end to end: real files in, chunks / keys / rejects / manifest out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from anthropic_batch.batch_requests import BatchRequestError, iter_chunk_requests
from anthropic_batch.operators.prepare import (
    PrepareRequestsOperator,
    load_prompt_template,
    resolve_mode,
)
from anthropic_batch.status import RunMode
from tests.plugins.anthropic_batch._operator_context import make_context

REPO = Path(__file__).resolve().parents[3]
INCLUDE_DIR = REPO / "include"

TICKETS = [
    {"ticket_id": "T1", "channel": "email", "customer_tier": "pro", "subject": "Charged twice", "body": "Hi"},
    {"ticket_id": "T2", "channel": "chat", "customer_tier": "free", "subject": "Crash", "body": "It crashes"},
    {"ticket_id": "T3", "channel": "chat", "customer_tier": "free", "subject": "Empty", "body": ""},
    {"ticket_id": None, "channel": "chat", "customer_tier": "free", "subject": "No id", "body": "x"},
    {"ticket_id": "T4", "channel": "web", "customer_tier": "pro", "subject": "Dup a", "body": "first"},
    {"ticket_id": "T4", "channel": "web", "customer_tier": "pro", "subject": "Dup b", "body": "second"},
    {"ticket_id": "T5", "channel": "phone", "customer_tier": "ent", "subject": "Ünïcode 😀", "body": "ok"},
    {"ticket_id": "T6", "channel": "email", "customer_tier": "pro", "subject": "Big", "body": "b" * 5000},
]
VALID = {"T1", "T2", "T5", "T6"}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _write_csv(path: Path, records: list[dict]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return path


def _operator(tmp_path: Path, source: Path, **overrides) -> PrepareRequestsOperator:
    kwargs = dict(
        task_id="prepare",
        source=str(source),
        key_columns=["ticket_id"],
        prompt_template="prompts/support_ticket.j2",
        model="claude-haiku-4-5",
        max_tokens=256,
        system_prompt="You triage tickets.",
        output_model="schemas/support_ticket.py:SupportTicketExtraction",
        output_mode="json_schema",
        include_dir=str(INCLUDE_DIR),
        work_dir=str(tmp_path / "work"),
        pipeline="tickets",
        partition="2026-11-01",
        mode="batch",
        max_requests_per_chunk=2,
    )
    kwargs.update(overrides)
    return PrepareRequestsOperator(**kwargs)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_prepare_writes_chunks_keys_rejects_and_manifest(tmp_path, fmt):
    writer = _write_jsonl if fmt == "jsonl" else _write_csv
    source = writer(tmp_path / f"tickets.{fmt}", TICKETS)
    op = _operator(tmp_path, source)
    paths = op.execute(make_context(task_id="prepare"))

    work = tmp_path / "work"
    manifest = json.loads((work / "requests" / "manifest.json").read_text())
    assert manifest["n_input_records"] == len(TICKETS)
    assert manifest["n_requests"] == len(VALID)
    assert manifest["n_rejected"] == len(TICKETS) - len(VALID)
    assert manifest["mode"] == "batch"
    spec = manifest["spec"]
    assert spec["pipeline"] == "tickets" and spec["partition"] == "2026-11-01"
    assert spec["output_model"] == "schemas/support_ticket.py:SupportTicketExtraction"
    assert spec["output_mode"] == "json_schema"
    assert spec["include_dir"] == str(INCLUDE_DIR)
    assert spec["key_columns"] == ["ticket_id"]
    assert [c["path"] for c in manifest["chunks"]] == paths

    # Every valid record is in exactly one chunk, with the rendered prompt and structured output params.
    requests = [r for p in paths for r in iter_chunk_requests(p)]
    # custom_id = key + "-" + a digest of the request (batch_requests.make_custom_id)
    assert sorted(r["custom_id"].rsplit("-", 1)[0] for r in requests) == sorted(VALID)
    by_id = {r["custom_id"].rsplit("-", 1)[0]: r for r in requests}
    assert "Subject: Ünïcode 😀" in by_id["T5"]["params"]["messages"][0]["content"]
    assert by_id["T1"]["params"]["output_config"]["format"]["type"] == "json_schema"
    assert by_id["T1"]["params"]["max_tokens"] == 256
    assert all(c["n_requests"] <= 2 for c in manifest["chunks"])
    assert sum(c["n_requests"] for c in manifest["chunks"]) == len(VALID)

    keys = pq.read_table(work / "requests" / "keys.parquet").to_pylist()
    assert sorted(k["ticket_id"] for k in keys) == sorted(VALID)

    rejected = pq.read_table(work / "rejected.parquet").to_pylist()
    reasons = {(r["ticket_id"], r["error_type"]) for r in rejected}
    assert reasons == {
        ("T3", "empty_prompt"),
        (None, "null_key"),
        ("T4", "duplicate_key"),
    }
    assert sum(1 for r in rejected if r["ticket_id"] == "T4") == 2  # both duplicates, nothing dropped
    assert all(r["stage"] == "prepare" and r["reason"] for r in rejected)
    assert all(json.loads(r["record_json"])["subject"] for r in rejected)


def test_oversized_records_are_rejected_not_dropped(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    paths = _operator(tmp_path, source, max_bytes_per_chunk=3000).execute(make_context())
    requests = {r["custom_id"].rsplit("-", 1)[0] for p in paths for r in iter_chunk_requests(p)}
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet").to_pylist()
    too_large = [r for r in rejected if r["error_type"] == "request_too_large"]
    assert [r["ticket_id"] for r in too_large] == ["T6"]
    assert requests == VALID - {"T6"}


def test_the_request_ceiling_is_separate_from_the_chunk_size(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    op = _operator(tmp_path, source, max_request_bytes=3000, max_requests_per_chunk=100)
    paths = op.execute(make_context())
    requests = {r["custom_id"].rsplit("-", 1)[0] for p in paths for r in iter_chunk_requests(p)}
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet").to_pylist()
    too_large = [r for r in rejected if r["error_type"] == "request_too_large"]
    assert [r["ticket_id"] for r in too_large] == ["T6"]
    # The limit named is the one configured, not an internal figure.
    assert "the limit is 3000 bytes (max_request_bytes)" in too_large[0]["reason"]
    assert requests == VALID - {"T6"}
    # The remaining requests all share one chunk bigger than the per-request ceiling.
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    [chunk] = manifest["chunks"]
    assert chunk["n_requests"] == len(VALID) - 1 and chunk["n_bytes"] > 3000

    # Without the ceiling the same record fits the (default) chunk size and is prepared.
    paths = _operator(tmp_path, source, max_requests_per_chunk=100).execute(make_context())
    assert {r["custom_id"].rsplit("-", 1)[0] for p in paths for r in iter_chunk_requests(p)} == VALID


def test_a_request_ceiling_above_the_chunk_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_request_bytes"):
        _operator(tmp_path, tmp_path / "t.jsonl", max_bytes_per_chunk=4096, max_request_bytes=8192)


def test_auto_mode_resolves_by_request_count(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    _operator(tmp_path, source, mode="auto", auto_sync_max_requests=10).execute(make_context())
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["mode"] == "sync"

    _operator(tmp_path, source, mode="auto", auto_sync_max_requests=3).execute(make_context())
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["mode"] == "batch"


def test_no_valid_record_succeeds_with_no_chunks(tmp_path):
    bad = [{"ticket_id": None, "channel": "c", "customer_tier": "t", "subject": "s", "body": "b"}] * 3
    source = _write_jsonl(tmp_path / "t.jsonl", bad)
    assert _operator(tmp_path, source).execute(make_context()) == []
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet")
    assert rejected.num_rows == 3
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["chunks"] == [] and manifest["n_requests"] == 0


def test_inline_template_and_no_output_model(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS[:2])
    paths = _operator(
        tmp_path,
        source,
        prompt_template="Summarise: {{ subject }}",
        output_model=None,
        output_mode=None,
    ).execute(make_context())
    requests = [r for p in paths for r in iter_chunk_requests(p)]
    assert {r["params"]["messages"][0]["content"] for r in requests} == {
        "Summarise: Charged twice",
        "Summarise: Crash",
    }
    assert all("output_config" not in r["params"] for r in requests)


def test_bad_mode_and_missing_template_fail_clearly(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    with pytest.raises(BatchRequestError, match="mode"):
        _operator(tmp_path, source, mode="fast").execute(make_context())
    with pytest.raises(BatchRequestError, match="not found"):
        _operator(tmp_path, source, prompt_template="prompts/nope.j2").execute(make_context())
    assert not (tmp_path / "work" / "requests" / "manifest.json").exists()


def test_auto_mode_takes_sync_when_the_deadline_is_nearer_than_a_batch_may_take(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    soon = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    _operator(tmp_path, source, mode="auto", auto_sync_max_requests=1, deadline=soon).execute(make_context())
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["mode"] == "sync" and manifest["deadline"]

    later = (datetime.now(UTC) + timedelta(days=3)).isoformat().replace("+00:00", "Z")
    _operator(tmp_path, source, mode="auto", auto_sync_max_requests=1, deadline=later).execute(make_context())
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["mode"] == "batch"

    with pytest.raises(BatchRequestError, match="deadline"):
        _operator(tmp_path, source, mode="auto", deadline="tomorrow-ish").execute(make_context())


def test_resolve_mode_and_template_loading():
    assert resolve_mode("auto", 200, 200) is RunMode.SYNC
    assert resolve_mode("auto", 201, 200) is RunMode.BATCH
    assert resolve_mode("SYNC", 10**6, 200) is RunMode.SYNC
    now = datetime(2026, 11, 1, tzinfo=UTC)
    assert resolve_mode("auto", 500, 200, deadline=now + timedelta(hours=23), now=now) is RunMode.SYNC
    assert resolve_mode("auto", 500, 200, deadline=now + timedelta(hours=25), now=now) is RunMode.BATCH
    assert resolve_mode("batch", 5, 200, deadline=now, now=now) is RunMode.BATCH  # explicit wins
    assert load_prompt_template("Hello {{ x }}.txt and more\nlines", None).startswith("Hello")
    assert "support ticket" in load_prompt_template("prompts/support_ticket.j2", INCLUDE_DIR)


def test_operators_package_exports_every_operator():
    from airflow.sdk import BaseOperator

    import anthropic_batch.operators as ops

    for name in ops.__all__:
        cls = getattr(ops, name)
        assert issubclass(cls, BaseOperator) and cls.__name__ == name
    with pytest.raises(AttributeError):
        _ = ops.NoSuchOperator


def test_a_misspelt_template_variable_fails_prepare_naming_it_and_the_template(tmp_path):
    # Today's ticket template reads {{ body }}; a copy with a typo must not become a run of rejects.
    template = INCLUDE_DIR.joinpath("prompts/support_ticket.j2").read_text().replace("body", "boddy")
    (tmp_path / "include" / "prompts").mkdir(parents=True)
    (tmp_path / "include" / "prompts" / "typo.j2").write_text(template)
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS)
    op = _operator(tmp_path, source, prompt_template="prompts/typo.j2", include_dir=str(tmp_path / "include"))
    op.output_model = None
    with pytest.raises(BatchRequestError) as err:
        op.execute(make_context())
    assert "prompt template prompts/typo.j2 uses boddy" in str(err.value)
    assert not (tmp_path / "work" / "requests" / "manifest.json").exists()


def test_a_non_utf8_jsonl_line_is_dead_lettered_and_the_day_proceeds(tmp_path):
    source = _write_jsonl(tmp_path / "t.jsonl", TICKETS[:2])
    with source.open("ab") as handle:
        handle.write(b'{"ticket_id": "T9", "channel": "email", "subject": "caf\xe9", "body": "latin-1"}\n')
    paths = _operator(tmp_path, source, max_requests_per_chunk=100).execute(make_context())
    # custom_id = key + "-" + request digest
    assert {r["custom_id"].rsplit("-", 1)[0] for p in paths for r in iter_chunk_requests(p)} == {"T1", "T2"}
    rejected = pq.read_table(tmp_path / "work" / "rejected.parquet").to_pylist()
    assert [(r["ticket_id"], r["error_type"]) for r in rejected] == [("T9", "unreadable_record")]
    assert "t.jsonl line 3: not valid UTF-8" in rejected[0]["reason"]


def test_a_corrupt_parquet_source_is_named(tmp_path):
    source = tmp_path / "tickets.parquet"
    source.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(BatchRequestError, match=f"cannot read parquet file .*{source}"):
        _operator(tmp_path, source).execute(make_context())


def test_prepare_warns_when_the_prefix_marked_for_caching_is_below_the_minimum(tmp_path, caplog):
    """Issue 13: a 60-token system prompt with cache_control is never cached by Haiku 4.5 (4,096)."""
    source = _write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    with caplog.at_level("WARNING"):
        _operator(tmp_path, source).execute(make_context(task_id="prepare"))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "caching" in r.getMessage()
    ]
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    cache = manifest["cache"]
    assert cache["marked"] and not cache["cacheable"] and cache["minimum"] == 4096
    assert len(warnings) == 1
    assert f"{cache['prefix_tokens']:,} tokens" in warnings[0] and "4,096" in warnings[0]


def test_prepare_does_not_warn_for_a_cacheable_prefix(tmp_path, caplog):
    source = _write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    with caplog.at_level("WARNING"):
        _operator(tmp_path, source, system_prompt="Rubric. " * 2100).execute(make_context(task_id="prepare"))
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "caching" in r.getMessage()]
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert manifest["cache"]["cacheable"] and manifest["cache"]["warning"] is None


def test_a_prompt_not_marked_for_caching_is_sent_plain_and_not_warned_about(tmp_path, caplog):
    """The overnight report's one-line prompt: no cache_control, so no write premium and no warning."""
    source = _write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    with caplog.at_level("WARNING"):
        _operator(tmp_path, source, cache_system_prompt=False).execute(make_context(task_id="prepare"))
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "caching" in r.getMessage()]
    manifest = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())
    assert not manifest["cache"]["marked"] and manifest["cache"]["warning"] is None
    chunk = (tmp_path / "work" / "requests").glob("chunk-*.jsonl")
    first = json.loads(next(iter(chunk)).read_text().splitlines()[0])
    assert isinstance(first["params"]["system"], str)  # no block, no cache_control


def test_the_shipped_extraction_rubric_is_read_from_its_file_and_is_long_enough_to_cache(tmp_path, caplog):
    """Issue 13: the demo's system prompt is a real shared rubric that Haiku 4.5 can cache."""
    import yaml

    config = yaml.safe_load((INCLUDE_DIR / "pipelines" / "bulk_extraction.yaml").read_text())
    source = _write_jsonl(tmp_path / "tickets.jsonl", TICKETS)
    op = _operator(tmp_path, source, system_prompt=config["system_prompt"], model=config["model"])
    with caplog.at_level("WARNING"):
        paths = op.execute(make_context(task_id="prepare"))
    [request, *_] = iter_chunk_requests(paths[0])
    rubric = (INCLUDE_DIR / config["system_prompt"]).read_text(encoding="utf-8")
    assert request["params"]["system"][0]["text"] == rubric
    assert request["params"]["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    cache = json.loads((tmp_path / "work" / "requests" / "manifest.json").read_text())["cache"]
    assert cache["cacheable"] and cache["prefix_tokens"] >= cache["minimum"] == 4096
    assert not [r for r in caplog.records if "caching" in r.getMessage() and r.levelname == "WARNING"]
