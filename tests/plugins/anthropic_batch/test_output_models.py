"""Output models: loading by reference, request params, extracting and validating answers."""

import json
import textwrap

import anthropic
import pytest
from pydantic import BaseModel, Field

from anthropic_batch.output_models import (
    OutputModelError,
    extract_output,
    load_output_model,
    output_params,
    output_tool_name,
    validate_output,
    validate_output_json,
)


class Ticket(BaseModel):
    """A support ticket, classified."""

    category: str
    urgency: int = Field(ge=1, le=5)


def _message(content, stop_reason="end_turn"):
    return {"type": "message", "role": "assistant", "content": content, "stop_reason": stop_reason}


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


def test_extract_json_schema_answer():
    text, structured, followup = extract_output(
        _message(
            [{"type": "text", "text": '{"category": "billing",'}, {"type": "text", "text": '"urgency": 2}'}]
        ),
        "json_schema",
    )
    assert text == '{"category": "billing","urgency": 2}'
    assert structured == {"category": "billing", "urgency": 2}
    assert followup is False


def test_extract_unparsable_json_gives_no_structure():
    text, structured, followup = extract_output(
        _message([{"type": "text", "text": "Sure! {"}]), "json_schema"
    )
    assert (text, structured, followup) == ("Sure! {", None, False)


def test_extract_forced_tool_answer():
    msg = _message(
        [{"type": "tool_use", "id": "t1", "name": "Ticket", "input": {"category": "bug", "urgency": 5}}],
        stop_reason="tool_use",
    )
    assert extract_output(msg, "tool", tool_name="Ticket") == ("", {"category": "bug", "urgency": 5}, False)


def test_extract_foreign_tool_or_pause_needs_followup():
    foreign = _message(
        [
            {"type": "text", "text": "let me look"},
            {"type": "tool_use", "name": "search", "input": {"q": "x"}},
        ],
        stop_reason="tool_use",
    )
    assert extract_output(foreign, "tool", tool_name="Ticket") == ("let me look", None, True)
    assert extract_output(foreign, None)[2] is True
    assert extract_output(foreign, "json_schema")[2] is True
    paused = _message([{"type": "text", "text": "..."}], stop_reason="pause_turn")
    assert extract_output(paused, None)[2] is True


def test_extract_plain_text_without_output_model():
    assert extract_output(_message([{"type": "text", "text": "hello"}]), None) == ("hello", None, False)


def test_validate_output():
    json_text, error = validate_output(Ticket, {"category": "x", "urgency": 3})
    assert error is None
    assert json.loads(json_text) == {"category": "x", "urgency": 3}
    json_text, error = validate_output(Ticket, {"category": "x", "urgency": 9})
    assert json_text is None
    assert "urgency" in error
    assert validate_output(Ticket, None) == (None, "no structured output in the answer")


def test_validate_output_json():
    assert validate_output_json(Ticket, '{"category":"x","urgency":1}')[1] is None
    json_text, error = validate_output_json(Ticket, "not json")
    assert json_text is None
    assert "JSON" in error
    assert validate_output_json(Ticket, "  ")[1] == "empty answer where JSON was expected"


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
