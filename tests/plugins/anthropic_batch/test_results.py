"""Result lines -> rows: every result type, costs, dedupe, missing rows, merge, classification."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import ObjectStoragePath
from pydantic import BaseModel, Field

from anthropic_batch.batch_requests import RequestSpec, prepare_requests
from anthropic_batch.pricing import builtin_price_table
from anthropic_batch.results import (
    MalformedResultLine,
    ParseContext,
    classify_failure,
    collect_lines,
    dead_letter_rows,
    dead_letter_schema,
    expected_ids_from_chunk,
    failure_codes,
    has_fatal,
    merge_attempts,
    parse_result_line,
    result_schema,
    retry_mask,
)
from anthropic_batch.status import FailureClass, RequestStatus

MODEL = "claude-sonnet-4-5"


class Ticket(BaseModel):
    """A classified ticket."""

    category: str
    urgency: int = Field(ge=1, le=5)


def usage(inp=1000, out=200, write=0, read=0):
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "service_tier": "batch",
    }


def message(content, stop_reason="end_turn", u=None, model=MODEL):
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": u or usage(),
    }


def succeeded(cid, content, **kw):
    return json.dumps(
        {"custom_id": cid, "result": {"type": "succeeded", "message": message(content, **kw)}}
    ).encode()


def text(t):
    return [{"type": "text", "text": t}]


def errored(cid, error_type, msg="boom"):
    return json.dumps(
        {
            "custom_id": cid,
            "result": {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": error_type, "message": msg},
                    "request_id": "req_1",
                },
            },
        }
    ).encode()


def simple(cid, kind):
    return json.dumps({"custom_id": cid, "result": {"type": kind}}).encode()


def ctx(ids=("a", "b", "c", "d", "e", "f"), output_model=Ticket, mode="json_schema", **kw):
    keys = pa.table(
        {
            "custom_id": list(ids),
            "ticket_id": [f"T-{i}" for i in ids],
            "request_fingerprint": [f"fp-{i}" for i in ids],
        }
    )
    base = {
        "output_model": output_model,
        "output_mode": mode,
        "prices": builtin_price_table(),
        "batch_id": "msgbatch_1",
        "attempt": 1,
        "default_model": MODEL,
    }
    return ParseContext.from_keys_table(keys, ["ticket_id"], **{**base, **kw})


# -- parse ------------------------------------------------------------------------------------------


def test_succeeded_with_valid_structured_output_and_costs():
    row = parse_result_line(
        succeeded(
            "a", text('{"category": "billing", "urgency": 2}'), u=usage(1000, 200, write=400, read=3000)
        ),
        ctx(),
    )
    assert row["status"] == RequestStatus.SUCCEEDED
    assert json.loads(row["output_json"]) == {"category": "billing", "urgency": 2}
    assert row["output_text"] == '{"category": "billing", "urgency": 2}'
    assert (row["custom_id"], row["ticket_id"], row["request_fingerprint"]) == ("a", "T-a", "fp-a")
    assert (row["batch_id"], row["attempt"], row["model"], row["stop_reason"]) == (
        "msgbatch_1",
        1,
        MODEL,
        "end_turn",
    )
    assert (row["input_tokens"], row["output_tokens"]) == (1000, 200)
    assert (row["cache_creation_input_tokens"], row["cache_read_input_tokens"]) == (400, 3000)
    # sonnet-4-5: 1000*3 + 200*15 + 400*6 (1h write) + 3000*0.3 = 3000+3000+2400+900 = 9300 per M
    assert row["sync_cost_usd"] == pytest.approx(0.0093, abs=1e-12)
    assert row["cost_usd"] == pytest.approx(0.00465, abs=1e-12)
    # the fast float path agrees with the exact Decimal reference
    exact = builtin_price_table().cost(
        MODEL, usage(1000, 200, write=400, read=3000), batch=True, cache_ttl="1h"
    )
    assert row["cost_usd"] == pytest.approx(exact, rel=1e-12)
    assert set(row) == set(result_schema(["ticket_id"]).names)


def test_invalid_output_schema_and_unparsable_text():
    bad = parse_result_line(succeeded("a", text('{"category": "x", "urgency": 9}')), ctx())
    assert bad["status"] == "invalid_output"
    assert bad["error_type"] == "validation_error"
    assert "urgency" in bad["error_message"]
    assert bad["output_json"] is None
    assert bad["cost_usd"] > 0  # the answer was billed
    prose = parse_result_line(succeeded("b", text("I think it is billing.")), ctx())
    assert prose["status"] == "invalid_output"
    assert "JSON" in prose["error_message"]
    cut = parse_result_line(succeeded("c", text('{"category": "bil'), stop_reason="max_tokens"), ctx())
    assert cut["status"] == "invalid_output"
    assert "max_tokens" in cut["error_message"]


def test_forced_tool_output():
    c = ctx(mode="tool")
    good = succeeded(
        "a",
        [{"type": "tool_use", "id": "t", "name": "Ticket", "input": {"category": "c", "urgency": 1}}],
        stop_reason="tool_use",
    )
    row = parse_result_line(good, c)
    assert row["status"] == "succeeded"
    assert json.loads(row["output_json"]) == {"category": "c", "urgency": 1}
    invalid = succeeded(
        "b",
        [{"type": "tool_use", "id": "t", "name": "Ticket", "input": {"category": "c"}}],
        stop_reason="tool_use",
    )
    assert parse_result_line(invalid, c)["status"] == "invalid_output"
    no_tool = succeeded("c", text("no tool today"))
    assert parse_result_line(no_tool, c)["status"] == "invalid_output"


def test_needs_followup_for_foreign_tool_and_pause_turn():
    foreign = succeeded(
        "a",
        [
            {"type": "text", "text": "checking"},
            {"type": "tool_use", "id": "t", "name": "search", "input": {}},
        ],
        stop_reason="tool_use",
    )
    row = parse_result_line(foreign, ctx(output_model=None))
    assert row["status"] == "needs_followup"
    assert "search" in row["error_message"]
    assert row["output_text"] == "checking"
    assert parse_result_line(foreign, ctx(mode="tool"))["status"] == "needs_followup"
    paused = succeeded("b", text("..."), stop_reason="pause_turn")
    assert parse_result_line(paused, ctx())["status"] == "needs_followup"


def test_plain_text_without_output_model():
    row = parse_result_line(succeeded("a", text("Hello") + text(" world")), ctx(output_model=None))
    assert (row["status"], row["output_text"], row["output_json"]) == ("succeeded", "Hello world", None)


@pytest.mark.parametrize("kind", ["canceled", "expired"])
def test_canceled_and_expired_cost_nothing(kind):
    row = parse_result_line(simple("a", kind), ctx())
    assert row["status"] == kind
    assert (row["cost_usd"], row["sync_cost_usd"], row["input_tokens"]) == (0.0, 0.0, None)
    assert row["ticket_id"] == "T-a"


def test_errored():
    row = parse_result_line(errored("a", "invalid_request_error", "max_tokens too large"), ctx())
    assert (row["status"], row["error_type"], row["error_message"]) == (
        "errored",
        "invalid_request_error",
        "max_tokens too large",
    )
    assert row["cost_usd"] == 0.0


def test_unknown_result_type_and_malformed_line():
    row = parse_result_line(simple("a", "vanished"), ctx())
    assert (row["status"], row["error_type"]) == ("errored", "unknown_result_type")
    with pytest.raises(MalformedResultLine):
        parse_result_line(b"{not json", ctx())


def test_dated_model_id_and_unpriced_model_fall_back():
    row = parse_result_line(
        succeeded("a", text("x"), model="claude-sonnet-4-5-20261001"), ctx(output_model=None)
    )
    assert row["model"] == "claude-sonnet-4-5-20261001"
    assert row["sync_cost_usd"] == pytest.approx((1000 * 3 + 200 * 15) / 1e6)
    odd = parse_result_line(succeeded("b", text("x"), model="emulator-model"), ctx(output_model=None))
    assert odd["sync_cost_usd"] == pytest.approx((1000 * 3 + 200 * 15) / 1e6)  # priced as the spec's model


def test_unpriced_spec_model_fails_before_parsing():
    with pytest.raises(KeyError, match="anthropic_batch_prices"):
        ctx(default_model="no-such-model")


# -- collect ----------------------------------------------------------------------------------------


def test_collect_all_types_dedupe_unknown_missing(tmp_path):
    lines = [
        succeeded("a", text('{"category": "billing", "urgency": 2}')),
        errored("b", "overloaded_error"),
        simple("c", "expired"),
        succeeded("a", text('{"category": "other", "urgency": 1}')),  # replayed after a resume: ignored
        b"",
        simple("zzz", "canceled"),  # not ours
        b'{"custom_id": "d", "result": {"type": "succeeded", "message": {"content": 5}}}',  # malformed
        b"garbage",
    ]
    out = ObjectStoragePath((tmp_path / "attempt-01" / "msgbatch_1.parquet").as_uri())
    stats = collect_lines(
        iter(lines), out, ctx(), expected_custom_ids={"a", "b", "c", "d", "e"}, row_group_size=2
    )
    table = pq.read_table(tmp_path / "attempt-01" / "msgbatch_1.parquet")
    assert table.schema == result_schema(["ticket_id"])
    assert table.column("custom_id").to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.column("status").to_pylist() == ["succeeded", "errored", "expired", "errored", "missing"]
    assert table.column("error_type").to_pylist()[3] == "malformed_result"
    assert json.loads(table.column("output_json")[0].as_py())["category"] == "billing"
    assert stats.n_lines == 7
    assert stats.n_rows == 5
    assert (stats.n_duplicates, stats.n_unknown, stats.n_malformed, stats.n_missing) == (1, 1, 2, 1)
    assert stats.unknown_custom_ids == ["zzz"]
    assert stats.counts_by_status == {"errored": 2, "expired": 1, "missing": 1, "succeeded": 1}
    assert stats.tokens == {"input": 1000, "output": 200, "cache_creation": 0, "cache_read": 0}
    assert stats.cost_usd == pytest.approx(table.column("cost_usd").to_numpy().sum())
    assert stats.sync_cost_usd == pytest.approx(2 * stats.cost_usd)
    assert pq.ParquetFile(tmp_path / "attempt-01" / "msgbatch_1.parquet").num_row_groups == 3
    assert stats.to_dict()["out_path"] == str(out)


def test_collect_splits_multi_line_items_and_strips_newlines(tmp_path):
    blob = b"\n".join([simple("a", "expired"), simple("b", "canceled")]) + b"\n"
    stats = collect_lines([blob, simple("c", "expired").decode() + "\r\n"], tmp_path / "r.parquet", ctx())
    assert stats.n_rows == 3


def test_collect_failure_leaves_no_partial_file(tmp_path):
    def lines():
        yield simple("a", "expired")
        raise ConnectionError("stream dropped")

    with pytest.raises(ConnectionError):
        collect_lines(lines(), tmp_path / "r.parquet", ctx())
    assert list(tmp_path.iterdir()) == []


def test_collect_from_a_prepared_work_dir(tmp_path):
    work = ObjectStoragePath((tmp_path / "work").as_uri())
    table = pa.table({"ticket_id": ["T1", "T2", "T3"], "text": ["x", "y", "z"]})
    spec = RequestSpec(model=MODEL, max_tokens=100, prompt_template="{{ text }}", output_model=Ticket)
    manifest = prepare_requests(table, ["ticket_id"], spec, work, max_requests_per_chunk=2)
    chunk0 = manifest.chunks[0].path
    c = ParseContext.from_work_dir(work, batch_id="b1", attempt=1, chunk_indices=[0], manifest=manifest)
    assert set(c.keys) == expected_ids_from_chunk(chunk0)
    assert {cid.rsplit("-", 1)[0] for cid in c.keys} == {"T1", "T2"}  # key + "-" + request digest
    t1 = next(cid for cid in c.keys if cid.startswith("T1-"))
    stats = collect_lines(
        [succeeded(t1, text('{"category":"a","urgency":1}'))],
        work / "results" / "attempt-01" / "b1.parquet",
        c,
        expected_custom_ids=expected_ids_from_chunk(chunk0),
    )
    assert stats.counts_by_status == {"missing": 1, "succeeded": 1}
    rows = pq.read_table(tmp_path / "work" / "results" / "attempt-01" / "b1.parquet").to_pylist()
    assert rows[0]["request_fingerprint"] and rows[0]["ticket_id"] == "T1"


def test_from_work_dir_loads_the_output_model_by_reference(tmp_path):
    include = tmp_path / "include"
    (include / "schemas").mkdir(parents=True)
    (include / "schemas" / "t.py").write_text(
        "from pydantic import BaseModel\n\nclass Out(BaseModel):\n    label: str\n"
    )
    work = ObjectStoragePath((tmp_path / "work").as_uri())
    from anthropic_batch.output_models import load_output_model

    model = load_output_model("schemas/t.py:Out", include)
    spec = RequestSpec(
        model=MODEL,
        max_tokens=10,
        prompt_template="{{ t }}",
        output_model=model,
        output_model_ref="schemas/t.py:Out",
        output_mode="tool",
    )
    prepare_requests(
        pa.table({"k": ["1"], "t": ["x"]}),
        ["k"],
        spec,
        work,
        extra_manifest={"spec": {"include_dir": str(include)}},
    )
    c = ParseContext.from_work_dir(work)
    assert c.output_model is model
    assert c.output_mode == "tool"
    assert c.tool_name == "Out"


def test_valid_answer_is_stored_as_written_and_validates():
    # output_json is the model's JSON text itself (validated, not re-serialised by pydantic)
    answer = '{ "urgency": 2,\n  "category": "billing" }'
    row = parse_result_line(succeeded("a", text(answer)), ctx())
    assert row["output_json"] == answer
    assert Ticket.model_validate_json(row["output_json"]) == Ticket(category="billing", urgency=2)
    tool = succeeded(
        "b",
        [{"type": "tool_use", "id": "t", "name": "Ticket", "input": {"urgency": 3, "category": "c"}}],
        stop_reason="tool_use",
    )
    tool_row = parse_result_line(tool, ctx(mode="tool"))
    assert json.loads(tool_row["output_json"]) == {"urgency": 3, "category": "c"}
    assert isinstance(tool_row["output_json"], str)


def test_collect_output_json_per_row_in_a_mixed_row_group(tmp_path):
    # valid, invalid, errored (no text), valid again, empty text: one conversion batch
    lines = [
        succeeded("a", text('{"category": "x", "urgency": 1}')),
        succeeded("b", text('{"category": "x", "urgency": 7}')),
        errored("c", "api_error"),
        succeeded("d", text('{"category": "é✓", "urgency": 5}')),
        succeeded("e", text("")),
    ]
    for mode, c in (("json_schema", ctx()), ("plain", ctx(output_model=None))):
        out = tmp_path / f"{mode}.parquet"
        collect_lines(lines, out, c)
        table = pq.read_table(out)
        table.validate(full=True)
        texts = table.column("output_text").to_pylist()
        assert texts == ['{"category": "x", "urgency": 1}', '{"category": "x", "urgency": 7}', None,
                         '{"category": "é✓", "urgency": 5}', ""]  # fmt: skip
        expected = [texts[0], None, None, texts[3], None] if mode == "json_schema" else [None] * 5
        assert table.column("output_json").to_pylist() == expected
    tool_out = tmp_path / "tool.parquet"
    tool_line = succeeded(
        "a",
        [{"type": "tool_use", "id": "t", "name": "Ticket", "input": {"category": "c", "urgency": 1}}],
        stop_reason="tool_use",
    )
    collect_lines([tool_line, errored("b", "api_error")], tool_out, ctx(mode="tool"))
    assert [json.loads(v) if v else v for v in pq.read_table(tool_out).column("output_json").to_pylist()] == [
        {"category": "c", "urgency": 1},
        None,
    ]


def test_parse_context_keys_is_a_compact_mapping():
    c = ctx(ids=("a", "b"))
    assert dict(c.keys) == {"a": (("T-a",), "fp-a"), "b": (("T-b",), "fp-b")}
    assert "a" in c.keys and "zzz" not in c.keys and len(c.keys) == 2
    # a plain mapping is accepted and turned into the same index
    plain = ParseContext(
        key_columns=["ticket_id"], keys={"x": (("T-x",), None)}, prices=builtin_price_table()
    )
    assert plain.keys["x"] == (("T-x",), None)
    assert parse_result_line(simple("x", "expired"), plain)["ticket_id"] == "T-x"


def test_expected_ids_outside_the_keys_get_missing_rows_with_null_keys(tmp_path):
    out = tmp_path / "r.parquet"
    stats = collect_lines(
        [simple("a", "expired")], out, ctx(ids=("a", "b")), expected_custom_ids={"a", "b", "q"}
    )
    rows = pq.read_table(out).to_pylist()
    assert [(r["custom_id"], r["ticket_id"], r["status"]) for r in rows] == [
        ("a", "T-a", "expired"),
        ("b", "T-b", "missing"),
        ("q", None, "missing"),
    ]
    assert stats.n_missing == 2


def test_collect_to_a_local_file_does_not_import_airflow(tmp_path):
    lines = tmp_path / "results.jsonl"
    lines.write_bytes(
        succeeded("a", text('{"category": "x", "urgency": 1}')) + b"\n" + simple("b", "expired")
    )
    code = f"""
import sys
import pyarrow as pa
from anthropic_batch.pricing import builtin_price_table
from anthropic_batch.results import ParseContext, collect_lines
keys = pa.table({{"custom_id": ["a", "b"], "k": ["1", "2"]}})
ctx = ParseContext.from_keys_table(keys, ["k"], prices=builtin_price_table(), default_model={MODEL!r})
with open({str(lines)!r}, "rb") as f:
    stats = collect_lines(f, {str(tmp_path / "out" / "r.parquet")!r}, ctx)
assert stats.n_rows == 2, stats
print(sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow.")))
"""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(repo / d) for d in ("plugins", "include", "."))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert pq.read_table(tmp_path / "out" / "r.parquet").num_rows == 2


def test_collect_to_an_object_store_url_goes_through_storage():
    from airflow.sdk.io import attach
    from fsspec.implementations.memory import MemoryFileSystem

    attach(protocol="memory", fs=MemoryFileSystem())
    out = ObjectStoragePath("memory://bucket/results/r.parquet")
    stats = collect_lines([simple("a", "expired")], out, ctx())
    assert stats.out_path == str(out)
    with out.open("rb") as handle:
        assert pq.ParquetFile(handle).read().column("status").to_pylist() == ["expired"]


# -- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "stop_reason", "expected"),
    [
        ("succeeded", None, "end_turn", None),
        ("succeeded", None, "max_tokens", FailureClass.RETRIABLE),
        ("invalid_output", "validation_error", "end_turn", FailureClass.RETRIABLE),
        ("expired", None, None, FailureClass.RETRIABLE),
        ("canceled", None, None, FailureClass.RETRIABLE),
        ("missing", None, None, FailureClass.RETRIABLE),
        ("errored", "api_error", None, FailureClass.RETRIABLE),
        ("errored", "overloaded_error", None, FailureClass.RETRIABLE),
        ("errored", "rate_limit_error", None, FailureClass.RETRIABLE),
        ("errored", "invalid_request_error", None, FailureClass.PERMANENT),
        ("errored", "something_new", None, FailureClass.PERMANENT),
        ("errored", "malformed_result", None, FailureClass.PERMANENT),
        ("needs_followup", "tool_use", "tool_use", FailureClass.PERMANENT),
        ("errored", "authentication_error", None, FailureClass.FATAL),
        ("errored", "permission_error", None, FailureClass.FATAL),
        ("errored", "billing_error", None, FailureClass.FATAL),
        (RequestStatus.EXPIRED, None, None, FailureClass.RETRIABLE),
    ],
)
def test_classify_failure(status, error_type, stop_reason, expected):
    assert classify_failure(status, error_type, stop_reason) is expected


# -- merge and dead letters -------------------------------------------------------------------------


def _collect(tmp_path, name, lines, attempt, batch_id, expected=None):
    path = tmp_path / f"{name}.parquet"
    collect_lines(lines, path, ctx(attempt=attempt, batch_id=batch_id), expected_custom_ids=expected)
    return str(path)


def test_merge_one_row_per_id_later_attempt_wins_among_equals(tmp_path):
    ok = text('{"category": "x", "urgency": 1}')
    p1 = _collect(
        tmp_path,
        "a1",
        [
            succeeded("a", ok),
            errored("b", "overloaded_error"),
            simple("c", "expired"),
            errored("d", "invalid_request_error"),
        ],
        1,
        "batch_1",
        expected={"a", "b", "c", "d", "e"},
    )
    p2 = _collect(
        tmp_path, "a2", [succeeded("b", ok), simple("c", "expired")], 2, "batch_2", expected={"b", "c", "e"}
    )
    p3 = _collect(tmp_path, "a3", [simple("c", "expired")], 3, "batch_3", expected={"c"})
    keys = pa.table({"custom_id": ["a", "b", "c", "d", "e", "f"], "ticket_id": list("ABCDEF")})
    out = tmp_path / "merged.parquet"
    stats = merge_attempts([p1, p2, p3], str(out), ["ticket_id"], expected_keys=keys)
    merged = pq.read_table(out)
    assert stats.n_rows == 6 and stats.max_attempt == 3
    assert stats.counts_by_status == {"errored": 1, "expired": 1, "missing": 2, "succeeded": 2}
    ids = merged.column("custom_id").to_pylist()
    assert sorted(ids) == ["a", "b", "c", "d", "e", "f"]
    assert len(ids) == len(set(ids))
    by_id = {r["custom_id"]: r for r in merged.to_pylist()}
    assert (by_id["a"]["status"], by_id["a"]["attempt"]) == ("succeeded", 1)
    assert (by_id["b"]["status"], by_id["b"]["attempt"], by_id["b"]["batch_id"]) == (
        "succeeded",
        2,
        "batch_2",
    )
    assert (by_id["c"]["status"], by_id["c"]["attempt"]) == ("expired", 3)
    assert (by_id["d"]["status"], by_id["d"]["error_type"]) == ("errored", "invalid_request_error")
    assert (by_id["e"]["status"], by_id["e"]["attempt"]) == ("missing", 2)
    assert (by_id["f"]["status"], by_id["f"]["ticket_id"]) == ("missing", "F")  # no attempt at all

    assert retry_mask(merged, max_attempts=3).to_pylist() == [
        by_id[i]["status"] in ("missing", "expired") and (by_id[i]["attempt"] or 1) < 3 for i in ids
    ]
    dead = dead_letter_rows(merged, ["ticket_id"], max_attempts=3)
    assert dead.schema == dead_letter_schema(["ticket_id"])
    dead_by_id = {r["custom_id"]: r for r in dead.to_pylist()}
    # c: retriable but exhausted (3 attempts); d: permanent. e (attempt 2) and f would be retried.
    assert set(dead_by_id) == {"c", "d"}
    assert "after 3 attempt" in dead_by_id["c"]["reason"]
    assert "permanent" in dead_by_id["d"]["reason"]
    assert (dead_by_id["c"]["stage"], dead_by_id["c"]["last_batch_id"], dead_by_id["c"]["attempts"]) == (
        "collect",
        "batch_3",
        3,
    )
    assert json.loads(dead_by_id["d"]["record_json"])["ticket_id"] == "T-d"
    # at the very end, everything not succeeded is a dead letter
    assert set(dead_letter_rows(merged, ["ticket_id"]).column("custom_id").to_pylist()) == {
        "c",
        "d",
        "e",
        "f",
    }
    assert not has_fatal(merged)


def test_merge_of_nothing_is_an_empty_table(tmp_path):
    stats = merge_attempts([], tmp_path / "m.parquet", ["ticket_id"])
    merged = pq.read_table(tmp_path / "m.parquet")
    assert stats.n_rows == merged.num_rows == 0
    assert merged.schema == result_schema(["ticket_id"])


def test_has_fatal(tmp_path):
    p = _collect(tmp_path, "f", [errored("a", "billing_error")], 1, "b")
    assert has_fatal(pq.read_table(p))


# -- best answer per record (issue 10 item 5) ---------------------------------------------------------


def test_merge_keeps_a_valid_truncated_answer_when_its_retry_comes_back_overloaded(tmp_path):
    """Free text cut at max_tokens is a valid answer: an overloaded retry must not erase it."""
    free = {"output_model": None}
    p1 = tmp_path / "a1.parquet"
    collect_lines(
        [
            succeeded("a", text("a useful but long answer"), stop_reason="max_tokens"),
            succeeded("b", text("ok")),
        ],
        p1,
        ctx(ids=("a", "b"), attempt=1, batch_id="batch_1", **free),
    )
    p2 = tmp_path / "a2.parquet"
    collect_lines(
        [errored("a", "overloaded_error")], p2, ctx(ids=("a", "b"), attempt=2, batch_id="batch_2", **free)
    )
    keys = pa.table({"custom_id": ["a", "b"], "ticket_id": ["A", "B"]})
    out = tmp_path / "merged.parquet"
    merge_attempts([str(p1), str(p2)], str(out), ["ticket_id"], expected_keys=keys)
    by_id = {r["custom_id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(by_id) == 2
    a = by_id["a"]
    assert (a["status"], a["stop_reason"], a["output_text"]) == (
        "succeeded",
        "max_tokens",
        "a useful but long answer",
    )
    assert (a["attempt"], a["batch_id"]) == (1, "batch_1")  # the answer's own lineage


@pytest.mark.parametrize("retry_truncated", [True, False])
def test_vectorised_classification_agrees_with_classify_failure(retry_truncated):
    statuses = [
        "succeeded",
        "errored",
        "canceled",
        "expired",
        "invalid_output",
        "needs_followup",
        "missing",
        "odd",
    ]
    error_types = [
        None,
        "api_error",
        "overloaded_error",
        "rate_limit_error",
        "invalid_request_error",
        "x",
        "authentication_error",
        "permission_error",
        "billing_error",
        "validation_error",
        "user_canceled",
    ]
    stops = [None, "end_turn", "max_tokens", "tool_use"]
    grid = [(s, e, r) for s in statuses for e in error_types for r in stops]
    status, error_type, stop = (pa.array(list(c), pa.string()) for c in zip(*grid, strict=True))
    codes = failure_codes(status, error_type, stop, retry_truncated=retry_truncated)
    expected = [classify_failure(*g, retry_truncated=retry_truncated) for g in grid]
    names = {0: None, 1: FailureClass.RETRIABLE, 2: FailureClass.PERMANENT, 3: FailureClass.FATAL}
    assert [names[int(c)] for c in codes] == expected


def _merge(tmp_path, attempts, ids, *, output_model=Ticket, **kwargs):
    """attempts: list of lists of result lines (attempt 1, 2, ...) -> (stats, merged rows by id, retry rows,
    dead letters by id)."""
    paths = []
    for n, lines in enumerate(attempts, start=1):
        path = tmp_path / f"attempt-{n}.parquet"
        collect_lines(lines, path, ctx(ids=ids, attempt=n, batch_id=f"batch_{n}", output_model=output_model))
        paths.append(str(path))
    keys = pa.table(
        {"custom_id": list(ids), "ticket_id": [f"T-{i}" for i in ids], "chunk_index": [0] * len(ids)}
    )
    stats = merge_attempts(
        paths,
        tmp_path / "merged.parquet",
        ["ticket_id"],
        expected_keys=keys,
        retry_path=tmp_path / "retry.parquet",
        dead_letter_path=tmp_path / "dead.parquet",
        **kwargs,
    )
    merged = {r["custom_id"]: r for r in pq.read_table(tmp_path / "merged.parquet").to_pylist()}
    retry = {r["custom_id"]: r for r in pq.read_table(tmp_path / "retry.parquet").to_pylist()}
    dead = {r["custom_id"]: r for r in pq.read_table(tmp_path / "dead.parquet").to_pylist()}
    assert len(merged) == stats.n_rows == len(ids)
    assert stats.n_retry == len(retry) and stats.n_dead_letters == len(dead)
    return stats, merged, retry, dead


def test_merge_keeps_the_best_answer_of_every_record(tmp_path):
    valid = text('{"category": "x", "urgency": 1}')
    invalid = text('{"category": "x"}')
    stats, merged, retry, dead = _merge(
        tmp_path,
        [
            [
                succeeded("a", invalid),  # invalid, complete
                succeeded("b", invalid, stop_reason="max_tokens"),  # invalid, truncated
                succeeded("c", valid, stop_reason="max_tokens"),  # valid, truncated
                succeeded("d", valid, stop_reason="max_tokens"),
                simple("e", "expired"),
            ],
            [
                errored("a", "overloaded_error"),  # any answer beats an error
                succeeded("b", invalid),  # complete beats truncated
                succeeded("c", invalid),  # valid beats invalid
                succeeded("d", valid),  # complete valid beats truncated valid
                errored("e", "api_error"),  # between errors the later one stays
            ],
        ],
        ids=("a", "b", "c", "d", "e"),
        max_attempts=3,
    )
    assert {i: (r["status"], r["attempt"]) for i, r in merged.items()} == {
        "a": ("invalid_output", 1),
        "b": ("invalid_output", 2),
        "c": ("succeeded", 1),
        "d": ("succeeded", 2),
        "e": ("errored", 2),
    }
    assert merged["c"]["stop_reason"] == "max_tokens" and merged["c"]["batch_id"] == "batch_1"
    # Retried: a, b (invalid), c (best is truncated, last try invalid: retriable), e. Not d (done).
    assert set(retry) == {"a", "b", "c", "e"}
    assert {i: (r["source_attempt"], r["grow"], r["chunk_index"]) for i, r in retry.items()} == {
        "a": (2, False, 0),
        "b": (2, False, 0),
        "c": (2, False, 0),
        "e": (2, False, 0),
    }
    assert (
        stats.retry_reasons
        == {
            "errored: overloaded_error": 1,
            "invalid_output: validation_error": 2,
            "errored: api_error": 1,
        }
        and not stats.fatal_error_types
    )
    assert not dead  # everything unfinished is retried


def test_a_permanent_last_failure_ends_the_retries_and_keeps_the_best_answer(tmp_path):
    valid = text('{"category": "x", "urgency": 1}')
    _, merged, retry, dead = _merge(
        tmp_path,
        [
            [succeeded("a", valid, stop_reason="max_tokens"), errored("b", "overloaded_error")],
            [errored("a", "invalid_request_error", "max_tokens too large"), errored("b", "overloaded_error")],
        ],
        ids=("a", "b"),
        max_attempts=2,
    )
    assert (merged["a"]["status"], merged["a"]["attempt"]) == ("succeeded", 1)
    assert not retry
    assert set(dead) == {"b"}  # a truncated but valid answer is data, not a dead letter
    assert (dead["b"]["attempts"], "after 2 attempt" in dead["b"]["reason"]) == (2, True)


def test_truncated_free_text_is_not_retried_without_retry_truncated(tmp_path):
    lines = [succeeded("a", text("long"), stop_reason="max_tokens"), errored("b", "api_error")]
    _, merged, retry, dead = _merge(
        tmp_path, [lines], ids=("a", "b"), output_model=None, max_attempts=3, retry_truncated=False
    )
    assert merged["a"]["status"] == "succeeded" and set(retry) == {"b"} and not dead
    (tmp_path / "on").mkdir()
    _, _, retry_on, _ = _merge(
        tmp_path / "on", [lines], ids=("a", "b"), output_model=None, max_attempts=3, retry_truncated=True
    )
    assert retry_on["a"]["grow"] is True and retry_on["b"]["grow"] is False


def test_a_fatal_failure_stops_every_retry(tmp_path):
    stats, _, retry, dead = _merge(
        tmp_path,
        [[errored("a", "billing_error"), errored("b", "overloaded_error")]],
        ids=("a", "b", "c"),
        max_attempts=3,
    )
    assert stats.fatal_error_types == {"billing_error": 1}
    assert not retry and set(dead) == {"a", "b", "c"}
    assert dead["c"]["status"] == "missing"


def test_bucketed_merge_equals_the_in_memory_merge(tmp_path):
    """Many buckets (spilled to disk) decide exactly what one in-memory bucket decides."""
    import random

    rng = random.Random(7)
    ids = [f"id-{i:05d}{'x' * rng.randrange(3)}" for i in range(1500)]
    valid = text('{"category": "x", "urgency": 1}')
    kinds = [
        lambda c: succeeded(c, valid),
        lambda c: succeeded(c, valid, stop_reason="max_tokens"),
        lambda c: succeeded(c, text("{}")),
        lambda c: errored(c, "overloaded_error"),
        lambda c: errored(c, "invalid_request_error"),
        lambda c: simple(c, "expired"),
    ]
    attempts = [
        [rng.choice(kinds)(c) for c in ids if rng.random() < 0.97],
        [rng.choice(kinds)(c) for c in ids if rng.random() < 0.3],
        [rng.choice(kinds)(c) for c in ids if rng.random() < 0.1],
    ]
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one = _merge(tmp_path / "one", attempts, ids=tuple(ids), max_attempts=4)
    many = _merge(
        tmp_path / "many", attempts, ids=tuple(ids), max_attempts=4, bucket_rows=300, row_group_size=128
    )
    assert one[0].n_buckets == 1 and many[0].n_buckets > 5
    for a, b in zip(one[1:], many[1:], strict=True):
        assert a == b
    assert one[0].counts_by_status == many[0].counts_by_status
    assert one[0].retry_reasons == many[0].retry_reasons


def test_requests_a_user_canceled_are_dead_lettered_not_retried(tmp_path):
    ids = ("a", "b", "c")
    lines = [
        succeeded("a", text('{"category": "x", "urgency": 1}')),
        simple("b", "canceled"),
        simple("c", "canceled"),
    ]
    path = tmp_path / "attempt-1.parquet"
    collect_lines(lines, path, ctx(ids=ids, batch_id="batch_1", user_cancel_reason="canceled by alice"))
    rows = {r["custom_id"]: r for r in pq.read_table(path).to_pylist()}
    assert rows["b"]["error_type"] == "user_canceled" and rows["b"]["error_message"] == "canceled by alice"
    assert classify_failure("canceled", "user_canceled") is FailureClass.PERMANENT
    # A deadline cancel (no user) stays retriable.
    assert classify_failure("canceled", None) is FailureClass.RETRIABLE

    keys = pa.table({"custom_id": list(ids), "ticket_id": [f"T-{i}" for i in ids], "chunk_index": [0] * 3})
    stats = merge_attempts(
        [str(path)],
        tmp_path / "merged.parquet",
        ["ticket_id"],
        expected_keys=keys,
        max_attempts=3,
        retry_path=tmp_path / "retry.parquet",
        dead_letter_path=tmp_path / "dead.parquet",
    )
    assert stats.n_retry == 0
    dead = {r["custom_id"]: r for r in pq.read_table(tmp_path / "dead.parquet").to_pylist()}
    assert set(dead) == {"b", "c"} and all("canceled by alice" in r["reason"] for r in dead.values())


# -- no process-wide switch outside our own work (issue 8) ----------------------------------------------
def test_collect_pulls_its_lines_under_the_process_settings_and_restores_them(tmp_path, monkeypatch):
    """The source of the lines (the SDK's download) is not our code: it never runs with the GC
    paused or Arrow's pool swapped, and both are as before once collect_lines returns."""
    import gc

    from anthropic_batch import results

    monkeypatch.setattr(results, "_PULL_BLOCK", 2)  # several blocks from six lines
    pool_before = pa.default_memory_pool().backend_name
    seen: list[tuple[bool, str]] = []

    def source():
        for cid in ("a", "b", "c", "d", "e", "f"):
            seen.append((gc.isenabled(), pa.default_memory_pool().backend_name))
            yield succeeded(cid, text('{"category": "x", "urgency": 1}'))

    assert gc.isenabled()
    stats = collect_lines(source(), tmp_path / "r.parquet", ctx(), expected_custom_ids=["a", "z"])
    assert stats.n_rows == 7 and stats.n_missing == 1
    assert seen == [(True, pool_before)] * 6
    assert gc.isenabled() and pa.default_memory_pool().backend_name == pool_before
