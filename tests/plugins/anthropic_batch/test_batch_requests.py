"""Table -> requests: spec validation, custom ids, chunking, streamed body, rejects."""

import json
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import ObjectStoragePath
from pydantic import BaseModel

from anthropic_batch.batch_requests import (
    BODY_OVERHEAD,
    BatchRequestError,
    RequestSpec,
    canonical_json,
    custom_id_base,
    iter_batch_body,
    iter_chunk_lines,
    iter_chunk_requests,
    load_table,
    make_custom_id,
    prepare_requests,
    read_manifest,
    read_source,
    sha256_hex,
    template_variables,
    write_chunk,
)
from anthropic_batch.results import dead_letter_schema

ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class Ticket(BaseModel):
    """A classified ticket."""

    category: str
    urgency: int


def spec(**kw):
    base = {
        "model": "claude-haiku-4-5",
        "max_tokens": 256,
        "prompt_template": "Classify this ticket:\n{{ subject }}\n{{ body }}",
        "system_prompt": "You classify support tickets.",
        "output_model": Ticket,
    }
    return RequestSpec(**{**base, **kw})


def tickets(n, start=0):
    return pa.table(
        {
            "ticket_id": [f"T{i:05d}" for i in range(start, start + n)],
            "subject": [f"subject {i}" for i in range(start, start + n)],
            "body": [f"body text {i} " * 5 for i in range(start, start + n)],
        }
    )


@pytest.fixture
def work(tmp_path):
    return ObjectStoragePath((tmp_path / "work").as_uri())


# -- spec -------------------------------------------------------------------------------------------


def test_params_shape_json_schema_and_cached_system():
    params = spec().build_params("hello")
    assert params["model"] == "claude-haiku-4-5"
    assert params["max_tokens"] == 256
    assert params["messages"] == [{"role": "user", "content": "hello"}]
    assert params["system"] == [
        {
            "type": "text",
            "text": "You classify support tickets.",
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    assert params["output_config"]["format"]["type"] == "json_schema"
    assert "tools" not in params


def test_params_forced_tool_and_uncached_system():
    params = spec(output_mode="tool", cache_system_prompt=False, extra_params={"stop_sequences": ["END"]})
    p = params.build_params("x")
    assert p["system"] == "You classify support tickets."
    assert p["tool_choice"] == {"type": "tool", "name": "Ticket"}
    assert [t["name"] for t in p["tools"]] == ["Ticket"]
    assert p["stop_sequences"] == ["END"]
    assert "output_config" not in p


def test_fingerprint_is_stable_and_sensitive():
    assert spec().fingerprint() == spec().fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", spec().fingerprint())
    others = [
        spec(prompt_template="other {{ subject }}"),
        spec(max_tokens=257),
        spec(model="claude-sonnet-4-5"),
        spec(system_prompt="other"),
        spec(output_mode="tool"),
        spec(output_model=None),
        spec(extra_params={"metadata": {"user_id": "u"}}),
    ]
    assert len({spec().fingerprint()} | {s.fingerprint() for s in others}) == len(others) + 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"extra_params": {"stream": True}}, "stream"),
        ({"extra_params": {"temperature": 0.2}}, "temperature"),
        ({"extra_params": {"top_p": 0.9}}, "top_p"),
        ({"extra_params": {"top_k": 5}}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_params": {"frobnicate": 1}}, "unknown request parameter 'frobnicate'"),
        ({"extra_params": {"model": "x"}}, "may not set 'model'"),
        ({"extra_params": {"speed": "fast"}}, "fast mode"),
        ({"prompt_template": "{{ unclosed"}, "not valid Jinja"),
        ({"prompt_template": "  "}, "prompt_template is empty"),
        ({"cache_ttl": "2h"}, "cache_ttl"),
        ({"output_mode": "xml"}, "output_mode"),
    ],
)
def test_validate_refuses_what_a_batch_would_refuse(kw, message):
    with pytest.raises(BatchRequestError, match=message):
        spec(**kw).validate()


def test_sampling_params_allowed_under_the_old_api_version():
    assert spec(extra_params={"temperature": 0.2}, api_version="2023-06-01").validate() == []


def test_tools_without_forced_choice_warn():
    tool = {"name": "lookup", "description": "look up", "input_schema": {"type": "object"}}
    warnings = spec(output_model=None, tools=[tool]).validate()
    assert any("needs_followup" in w for w in warnings)
    assert (
        spec(output_model=None, tools=[tool], tool_choice={"type": "tool", "name": "lookup"}).validate() == []
    )


def test_prepare_refuses_bad_spec_before_writing(work):
    with pytest.raises(BatchRequestError):
        prepare_requests(tickets(3), ["ticket_id"], spec(max_tokens=0), work)
    assert not work.exists()
    with pytest.raises(BatchRequestError, match="key columns"):
        prepare_requests(tickets(3), ["nope"], spec(), work)


# -- custom ids -------------------------------------------------------------------------------------


FP = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "keys",
    [
        ["T00001"],
        [12345],
        ["a", "b"],
        ["with space", 1],
        ["ünïcödé/ключ"],
        ["x" * 200],
        ["a-b", "c"],
        ["!!!"],
        [1.5, "2026-11-01"],
    ],
)
def test_custom_id_pattern_and_determinism(keys):
    cid = make_custom_id(keys, FP)
    assert ID_RE.match(cid), cid
    assert make_custom_id(list(keys), FP) == cid
    assert cid == custom_id_base(keys) + "-" + FP[:8]


def test_custom_id_readable_when_possible():
    assert custom_id_base(["T00001"]) == "T00001"
    assert make_custom_id(["T00001"], FP) == "T00001-01234567"
    assert custom_id_base([42]) == "42"
    assert custom_id_base(["acme", 7]) == "acme-7"
    assert custom_id_base(["hello world"]).startswith("hello_world-")
    # A key that fits the pattern but leaves no room for the digest is hashed, still readable.
    long_key = "k" * 60
    assert custom_id_base([long_key]).startswith("k" * 20) and len(make_custom_id([long_key], FP)) <= 64


def test_custom_id_carries_a_digest_of_its_request():
    """Same keys, another request (edited text, model, params): another custom_id."""
    other = sha256_hex("other request")
    assert make_custom_id(["T1"], FP) != make_custom_id(["T1"], other)
    assert make_custom_id(["T1"], other) == "T1-" + other[:8]
    with pytest.raises(ValueError):
        make_custom_id(["T1"], "")


def test_custom_id_distinguishes_ambiguous_joins():
    ids = {
        custom_id_base(["a-b", "c"]),
        custom_id_base(["a", "b-c"]),
        custom_id_base(["a b"]),
        custom_id_base(["a_b"]),
        custom_id_base(["a/b"]),
    }
    assert len(ids) == 5


def test_custom_id_rejects_null():
    with pytest.raises(ValueError):
        custom_id_base([None])
    with pytest.raises(ValueError):
        custom_id_base([])


# -- load_table -------------------------------------------------------------------------------------


def test_load_table_formats(tmp_path):
    df = pd.DataFrame({"id": ["007", "008"], "text": ["a", "b"]})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in.parquet")
    df.to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in df.to_dict("records")) + "\n")
    for name in ("in.parquet", "in.csv", "in.jsonl"):
        table = load_table(str(tmp_path / name))
        assert table.column("id").to_pylist() == ["007", "008"], name  # CSV keeps leading zeros
    assert load_table(ObjectStoragePath((tmp_path / "in.csv").as_uri())).num_rows == 2
    (tmp_path / "data.txt").write_text("id,text\n1,a\n")
    assert load_table(str(tmp_path / "data.txt"), fmt="csv").num_rows == 1
    assert load_table(df).num_rows == 2
    with pytest.raises(BatchRequestError, match="format"):
        load_table(str(tmp_path / "data.txt"))
    with pytest.raises(BatchRequestError, match="not found"):
        load_table(str(tmp_path / "missing.csv"))


# -- prepare ----------------------------------------------------------------------------------------


def test_prepare_writes_chunks_keys_and_manifest(work):
    manifest = prepare_requests(
        tickets(10), ["ticket_id"], spec(), work, extra_manifest={"spec": {"pipeline": "p"}, "mode": "sync"}
    )
    assert manifest == read_manifest(work)
    assert manifest.n_requests == 10
    assert manifest.n_rejected == 0
    assert manifest.n_input_records == 10
    assert manifest.mode == "sync"
    assert manifest.spec.pipeline == "p"
    assert manifest.spec.spec_fingerprint == spec().fingerprint() == manifest.spec_fingerprint
    (chunk,) = manifest.chunks
    path = ObjectStoragePath(chunk.path)
    data = path.read_bytes()
    assert chunk.fingerprint == sha256_hex(data)
    assert chunk.index == 0
    assert path.name == "chunk-00000.jsonl"
    lines = data.splitlines()
    assert len(lines) == chunk.n_requests == 10
    for line in lines:
        assert line == canonical_json(json.loads(line)).encode()
    first = json.loads(lines[0])
    assert first["custom_id"] == "T00000-" + sha256_hex(canonical_json(first["params"]))[:8]
    assert (
        first["params"]["messages"][0]["content"] == "Classify this ticket:\nsubject 0\n" + "body text 0 " * 5
    )

    keys = pq.read_table((work / "requests" / "keys.parquet").path)
    assert keys.column_names == ["custom_id", "ticket_id", "request_fingerprint", "chunk_index"]
    fingerprints = keys.column("request_fingerprint").to_pylist()
    assert keys.column("custom_id").to_pylist() == [f"T{i:05d}-{fingerprints[i][:8]}" for i in range(10)]
    assert keys.column("request_fingerprint")[0].as_py() == sha256_hex(canonical_json(first["params"]))
    assert pq.read_table((work / "rejected.parquet").path).num_rows == 0


def test_chunk_split_by_count(work):
    manifest = prepare_requests(tickets(25), ["ticket_id"], spec(), work, max_requests_per_chunk=10)
    assert [c.n_requests for c in manifest.chunks] == [10, 10, 5]
    assert [c.index for c in manifest.chunks] == [0, 1, 2]
    keys = pq.read_table((work / "requests" / "keys.parquet").path)
    assert keys.column("chunk_index").to_pylist() == [0] * 10 + [1] * 10 + [2] * 5
    ids = [r["custom_id"] for c in manifest.chunks for r in iter_chunk_requests(c.path)]
    assert ids == keys.column("custom_id").to_pylist()


def test_chunk_split_by_bytes_and_body_size_exact(work):
    one = next(iter_chunk_lines(prepare_requests(tickets(1), ["ticket_id"], spec(), work).chunks[0].path))
    limit = BODY_OVERHEAD + 3 * (len(one) + 1) + 5  # room for three requests, not four
    manifest = prepare_requests(tickets(10), ["ticket_id"], spec(), work, max_bytes_per_chunk=limit)
    assert [c.n_requests for c in manifest.chunks] == [3, 3, 3, 1]
    for chunk in manifest.chunks:
        body = b"".join(iter_batch_body(chunk.path))
        assert len(body) == chunk.n_bytes <= limit
    # a re-run with fewer chunks removes the stale chunk files
    prepare_requests(tickets(10), ["ticket_id"], spec(), work)
    assert sorted(p.name for p in (work / "requests").iterdir() if p.name.startswith("chunk-")) == [
        "chunk-00000.jsonl"
    ]


def test_streamed_body_is_valid_json_equal_to_the_requests_and_reiterable(work):
    manifest = prepare_requests(tickets(50), ["ticket_id"], spec(), work)
    path = manifest.chunks[0].path
    body = iter_batch_body(path, block_size=1000)
    blocks = list(body)
    assert len(blocks) > 5  # really streamed in blocks
    assert all(len(b) < 1000 + 2000 for b in blocks)
    decoded = json.loads(b"".join(blocks))
    assert decoded == {"requests": list(iter_chunk_requests(path))}
    assert b"".join(body) == b"".join(blocks)  # second iteration resends the same bytes
    assert body.n_bytes == len(b"".join(blocks)) == manifest.chunks[0].n_bytes


def test_empty_chunk_body_is_valid_json(tmp_path):
    info = write_chunk([], tmp_path / "chunk-00003.jsonl")
    assert info["index"] == 3
    assert info["n_requests"] == 0
    assert json.loads(b"".join(iter_batch_body(info["path"]))) == {"requests": []}


def test_write_chunk_for_retries(work):
    manifest = prepare_requests(tickets(5), ["ticket_id"], spec(), work)
    lines = list(iter_chunk_lines(manifest.chunks[0].path))[1:3]
    info = write_chunk(lines, work / "retry" / "chunk-00000.jsonl", index=7)
    assert info["index"] == 7
    assert info["n_requests"] == 2
    assert list(iter_chunk_lines(info["path"])) == lines
    assert info["n_bytes"] == len(b"".join(iter_batch_body(info["path"])))


def test_rejects_lose_nothing(work):
    table = pa.table(
        {
            "ticket_id": ["A", "B", "B", None, "  ", "C", "D", "E", "F", "G", "G", "G"],
            "subject": ["s", "s", "s", "s", "s", "s", "s", None, "s", "s", "s", "s"],
            "body": ["b", "b", "b2", "b", "b", "b", "x" * 5000, "b", "b", "b", "b", "b"],
        }
    )
    s = spec(prompt_template="{{ subject }}{% if subject %} {{ body }}{% endif %}")
    manifest = prepare_requests(table, ["ticket_id"], s, work, max_request_bytes=4000)
    rejected = pq.read_table((work / "rejected.parquet").path)
    assert rejected.schema == dead_letter_schema(["ticket_id"])
    assert manifest.n_requests + manifest.n_rejected == manifest.n_input_records == table.num_rows
    assert rejected.num_rows == manifest.n_rejected
    by_type = {}
    for row in rejected.to_pylist():
        by_type.setdefault(row["error_type"], []).append(row["ticket_id"])
        assert row["stage"] == "prepare"
        assert row["reason"]
        assert json.loads(row["record_json"])["subject"] in ("s", None)
    assert by_type == {
        "duplicate_key": ["B", "B", "G", "G", "G"],
        "null_key": [None, None],
        "request_too_large": ["D"],
        "empty_prompt": ["E"],
    }
    prepared = [r["custom_id"] for r in iter_chunk_requests(manifest.chunks[0].path)]
    assert [cid.rsplit("-", 1)[0] for cid in prepared] == ["A", "C", "F"]


def test_template_errors_are_rejected_per_record(work):
    # The column exists; one record's value cannot be rendered (no attribute of a null): that record only.
    table = pa.table({"ticket_id": ["A", "B"], "subject": [{"title": "s"}, None]})
    manifest = prepare_requests(table, ["ticket_id"], spec(prompt_template="{{ subject.title }}"), work)
    assert manifest.n_requests == 1
    rejected = pq.read_table((work / "rejected.parquet").path).to_pylist()
    assert [(r["ticket_id"], r["error_type"]) for r in rejected] == [("B", "template_error")]
    assert "title" in rejected[0]["reason"]


def test_a_template_variable_the_input_lacks_fails_prepare_naming_it(work):
    table = pa.table({"ticket_id": ["A", "B"], "description": ["d", "e"]})
    with pytest.raises(BatchRequestError) as err:
        prepare_requests(
            table,
            ["ticket_id"],
            spec(prompt_template="{% for i in range(2) %}{{ descripton }}{% endfor %}{{ ticket_id }}"),
            work,
            template_name="prompt template prompts/t.j2",
        )
    message = str(err.value)
    assert "prompts/t.j2 uses descripton" in message and "description" in message  # the columns it has
    assert "range" not in message.split("(its columns")[0]  # Jinja's globals are not input columns
    assert not (work / "requests" / "manifest.json").exists()  # nothing prepared, nothing published


def test_template_variables():
    source = "{% set n = 2 %}{{ a }} {{ b.c }} {% for x in items %}{{ x }}{{ loop.index }}{% endfor %}{{ n }}"
    assert template_variables(source) == {"a", "b", "items"}


# -- reading sources ----------------------------------------------------------------------------------


def test_unreadable_jsonl_lines_are_returned_with_line_and_reason(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"ticket_id": "A", "body": "fine", "day": "2026-11-05"}).encode(),
        b'{"ticket_id": "B", "body": "caf\xe9 latin-1"}',
        b"",
        b'{"ticket_id": "C", "body": ',
        b"[1, 2]",
        json.dumps({"ticket_id": "D", "body": "also fine", "n": 7}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    table, unreadable = read_source(str(path))
    assert table.column("ticket_id").to_pylist() == ["A", "D"]
    assert table.column("day").to_pylist() == ["2026-11-05", None]  # a date-like string stays text
    assert [u.line for u in unreadable] == [2, 4, 5]
    assert all(u.source.endswith(str(path)) for u in unreadable)  # the file, as a URL
    assert "not valid UTF-8" in unreadable[0].reason and "0xe9" in unreadable[0].reason
    assert unreadable[0].record == {"ticket_id": "B", "body": "caf\ufffd latin-1"}  # keys salvaged
    assert "\\xe9" in unreadable[0].raw  # the original byte is kept
    assert "not valid JSON" in unreadable[1].reason
    assert "not a JSON object" in unreadable[2].reason
    with pytest.raises(BatchRequestError, match=r"in.jsonl line 2: not valid UTF-8.*and 2 more"):
        load_table(str(path))


def test_mixed_types_in_a_jsonl_column_are_kept_as_text(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "A", "v": 7}\n{"id": "B", "v": "seven"}\n{"id": "C", "v": {"x": 1}}\n')
    table = load_table(str(path))
    assert table.column("v").to_pylist() == ["7", "seven", '{"x": 1}']


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("corrupt.parquet", b"PAR1 this is not parquet at all", None),
        ("bad.csv", b"id,text\n1,a\n2,b,c,d\n", None),
        ("latin1.csv", b"id,text\n1,caf\xe9\n", None),
    ],
)
def test_read_errors_name_the_file(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BatchRequestError) as err:
        load_table(str(path), fmt)
    assert str(path) in str(err.value)


def test_unreadable_lines_are_dead_lettered_and_the_rest_proceeds(work, tmp_path):
    path = tmp_path / "in.jsonl"
    good = [{"ticket_id": f"T{i}", "subject": "s", "body": "b"} for i in range(3)]
    raw = [json.dumps(r).encode() for r in good]
    raw.insert(1, b'{"ticket_id": "BAD", "subject": "\xff\xfe", "body": "b"}')
    path.write_bytes(b"\n".join(raw) + b"\n")
    table, unreadable = read_source(str(path))
    manifest = prepare_requests(table, ["ticket_id"], spec(), work, unreadable=unreadable)
    assert manifest.n_requests == 3 and manifest.n_rejected == 1 and manifest.n_input_records == 4
    (dead,) = pq.read_table((work / "rejected.parquet").path).to_pylist()
    assert dead["error_type"] == "unreadable_record" and dead["stage"] == "prepare"
    assert dead["ticket_id"] == "BAD"
    assert f"{path} line 2: not valid UTF-8" in dead["reason"]
    assert json.loads(dead["record_json"])["line"] == 2


def test_a_source_of_only_unreadable_lines_prepares_nothing_and_keeps_every_line(work, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xff\n{nope\n")
    table, unreadable = read_source(str(path))
    manifest = prepare_requests(table, ["ticket_id"], spec(), work, unreadable=unreadable)
    assert manifest.n_requests == 0 and manifest.n_rejected == 2
    rejected = pq.read_table((work / "rejected.parquet").path).to_pylist()
    assert [json.loads(r["record_json"])["line"] for r in rejected] == [1, 2]


def test_custom_id_collisions_are_detected(work, monkeypatch):
    import anthropic_batch.batch_requests as br

    # Force a collision the hash would practically never produce: every key maps to one id.
    monkeypatch.setattr(br, "custom_id_base", lambda keys: "same")
    manifest = prepare_requests(tickets(3), ["ticket_id"], spec(), work)
    assert manifest.n_requests == 0
    rejected = pq.read_table((work / "rejected.parquet").path).to_pylist()
    assert {r["error_type"] for r in rejected} == {"custom_id_collision"}
    assert len(rejected) == 3


def test_multi_key_columns_and_non_string_keys(work):
    table = pa.table(
        {"shop": ["acme", "acme", "globex"], "n": [1, 2, 1], "subject": ["a", "b", "c"], "body": ["", "", ""]}
    )
    prepare_requests(table, ["shop", "n"], spec(), work)
    keys = pq.read_table((work / "requests" / "keys.parquet").path).to_pylist()
    assert [(k["custom_id"].rsplit("-", 1)[0], k["shop"], k["n"]) for k in keys] == [
        ("acme-1", "acme", "1"),
        ("acme-2", "acme", "2"),
        ("globex-1", "globex", "1"),
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"output_mode": "tool", "extra_params": {"metadata": {"user_id": "u"}, "stop_sequences": ["Ω"]}},
        {"output_model": None, "system_prompt": None},
        {"cache_system_prompt": False, "extra_params": {"service_tier": "auto"}},
    ],
)
def test_spliced_params_json_is_exactly_canonical(kw):
    from anthropic_batch.batch_requests import _params_serializer

    s = spec(**kw)
    serialise = _params_serializer(s.base_params())
    for prompt in ("hello", 'quotes " and \\ and ünïcode\n', ""):
        assert serialise(prompt) == canonical_json(s.build_params(prompt))
