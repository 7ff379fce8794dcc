"""Output models: loading by reference, request params, extracting and validating answers."""

import json
import textwrap

import anthropic
import pytest
from pydantic import BaseModel, Field

from anthropic_batch.output_models import (
    OutputModelError,
    load_output_model,
    output_params,
    output_tool_name,
)
from anthropic_batch.results import ParseContext, parse_result_line


class Ticket(BaseModel):
    """A support ticket, classified."""

    category: str
    urgency: int = Field(ge=1, le=5)


def test_load_output_model_by_reference(tmp_path):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "tickets.py").write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            from pydantic import BaseModel

            class Inner(BaseModel):
                name: str

            class Extraction(BaseModel):
                inner: Inner
                score: float
            """
        )
    )
    cls = load_output_model("schemas/tickets.py:Extraction", tmp_path)
    assert cls.__name__ == "Extraction"
    assert cls.model_validate({"inner": {"name": "x"}, "score": 1}).inner.name == "x"
    # cached: the same class object, so isinstance checks agree across calls
    assert load_output_model("schemas/tickets.py:Extraction", str(tmp_path)) is cls
    # the module name is stable and importable by pickle-like lookups
    assert cls.__module__.startswith("anthropic_batch_output_models.tickets_")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("schemas/nope.py:X", "not found"),
        ("schemas/m.py:Missing", "has no class"),
        ("schemas/m.py:NOT_A_MODEL", "not a pydantic"),
        ("schemas/m.py", "must look like"),
    ],
)
def test_load_output_model_errors(tmp_path, ref, message):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "m.py").write_text("NOT_A_MODEL = 1\n")
    with pytest.raises(OutputModelError, match=message):
        load_output_model(ref, tmp_path)


def test_output_params_json_schema_uses_transform_schema():
    params = output_params(Ticket, "json_schema")
    assert params == {
        "output_config": {"format": {"type": "json_schema", "schema": anthropic.transform_schema(Ticket)}}
    }
    assert params["output_config"]["format"]["schema"]["additionalProperties"] is False


def test_output_params_forced_tool():
    params = output_params(Ticket, "tool")
    (tool,) = params["tools"]
    assert tool["name"] == output_tool_name(Ticket) == "Ticket"
    assert tool["description"] == "A support ticket, classified."
    assert tool["input_schema"] == anthropic.transform_schema(Ticket)
    assert params["tool_choice"] == {"type": "tool", "name": "Ticket"}
    with pytest.raises(ValueError, match="output_mode"):
        output_params(Ticket, "xml")


# Answers are extracted and validated on the real path: a result line through results.parse_result_line.
def _row(content, stop_reason="end_turn", *, model=Ticket, mode="json_schema"):
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": content,
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    line = json.dumps({"custom_id": "r1", "result": {"type": "succeeded", "message": message}})
    row = parse_result_line(line, ParseContext(key_columns=[], keys={}, output_model=model, output_mode=mode))
    return row["status"], row["output_text"], row["output_json"], row["error_message"]


def test_extract_json_schema_answer():
    status, text, output_json, _ = _row(
        [{"type": "text", "text": '{"category": "billing",'}, {"type": "text", "text": '"urgency": 2}'}]
    )
    assert text == '{"category": "billing","urgency": 2}'
    assert json.loads(output_json) == {"category": "billing", "urgency": 2}
    assert status == "succeeded"


def test_extract_unparsable_json_gives_no_structure():
    status, text, output_json, error = _row([{"type": "text", "text": "Sure! {"}])
    assert (status, text, output_json) == ("invalid_output", "Sure! {", None)
    assert "JSON" in error


def test_extract_forced_tool_answer():
    content = [{"type": "tool_use", "id": "t1", "name": "Ticket", "input": {"category": "bug", "urgency": 5}}]
    status, text, output_json, _ = _row(content, "tool_use", mode="tool")
    assert (status, text) == ("succeeded", "")
    assert json.loads(output_json) == {"category": "bug", "urgency": 5}


def test_extract_foreign_tool_or_pause_needs_followup():
    foreign = [
        {"type": "text", "text": "let me look"},
        {"type": "tool_use", "name": "search", "input": {"q": "x"}},
    ]
    assert _row(foreign, "tool_use", mode="tool")[:3] == ("needs_followup", "let me look", None)
    assert _row(foreign, "tool_use", model=None, mode=None)[0] == "needs_followup"
    assert _row(foreign, "tool_use")[0] == "needs_followup"
    assert _row([{"type": "text", "text": "..."}], "pause_turn", model=None, mode=None)[0] == "needs_followup"


def test_extract_plain_text_without_output_model():
    row = _row([{"type": "text", "text": "hello"}], model=None, mode=None)
    assert row[:3] == ("succeeded", "hello", None)


def test_validate_output():
    content = [{"type": "tool_use", "id": "t1", "name": "Ticket", "input": {"category": "x", "urgency": 3}}]
    status, _, output_json, error = _row(content, "tool_use", mode="tool")
    assert (status, error) == ("succeeded", None)
    assert json.loads(output_json) == {"category": "x", "urgency": 3}
    content[0]["input"]["urgency"] = 9
    status, _, output_json, error = _row(content, "tool_use", mode="tool")
    assert (status, output_json) == ("invalid_output", None)
    assert "urgency" in error
    assert _row([], mode="tool")[3] == "no Ticket tool_use block in the answer"


def test_validate_output_json():
    assert _row([{"type": "text", "text": '{"category":"x","urgency":1}'}])[3] is None
    status, _, output_json, error = _row([{"type": "text", "text": "not json"}])
    assert (status, output_json) == ("invalid_output", None)
    assert "JSON" in error
    assert _row([{"type": "text", "text": "  "}])[3] == "empty answer where JSON was expected"


def test_edited_schema_file_is_reloaded(tmp_path):
    import os

    path = tmp_path / "m.py"
    path.write_text("from pydantic import BaseModel\n\nclass M(BaseModel):\n    a: int\n")
    first = load_output_model("m.py:M", tmp_path)
    assert load_output_model("m.py:M", tmp_path) is first
    path.write_text("from pydantic import BaseModel\n\nclass M(BaseModel):\n    a: int\n    b: str\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_output_model("m.py:M", tmp_path)
    assert second is not first
    assert set(second.model_fields) == {"a", "b"}
