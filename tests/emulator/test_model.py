"""The deterministic stand-in model as pure functions: schema instances, tokens, truncation."""

from __future__ import annotations

import datetime
import decimal
import enum
import random
import uuid
from typing import Literal

import anthropic
import jsonschema
import pytest
from pydantic import BaseModel, Field

from batches_emulator import model


class LineItem(BaseModel):
    sku: str = Field(min_length=3, max_length=12)
    quantity: int = Field(ge=1, le=9)
    unit_price: float = Field(gt=0, lt=1000)


class Invoice(BaseModel):
    invoice_id: str
    currency: Literal["EUR", "USD", "GBP"]
    paid: bool
    items: list[LineItem]
    notes: str | None = None
    parent: Invoice | None = None  # recursive: exercises $ref to the root via $defs
    tags: list[str] = []


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Event(BaseModel):
    when: datetime.datetime
    day: datetime.date
    ident: uuid.UUID


class Rich(BaseModel):
    """Types whose constraints transform_schema moves into descriptions, or that need care."""

    color: Color
    counts: dict[str, int]
    price: decimal.Decimal
    events: list[Event] = Field(min_length=2, max_length=3)
    level: int = Field(ge=0, le=3, description="How loud, 0 to 3")
    ratio: float = Field(ge=0.0, le=1.0)
    code: str = Field(min_length=3, max_length=3)
    pair: tuple[int, str]
    maybe: int | None


SCHEMAS = [
    {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 5, "maximum": 7}, "minItems": 2, "maxItems": 4},
    {"enum": ["x", "y", 3]},
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
    {"type": ["number", "null"], "minimum": -1, "maximum": 1},
    {
        "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "boolean"}}, "required": ["v"]}},
        "type": "object",
        "properties": {"nodes": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["nodes"],
    },
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "email"},
    {"const": "fixed"},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}},
        "required": ["n"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_generated_instances_validate(schema):
    for seed in range(25):
        instance = model.generate_instance(schema, random.Random(seed))
        jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("output_model", [Invoice, Rich])
def test_transform_schema_of_a_pydantic_model_round_trips_through_the_model(output_model):
    schema = anthropic.transform_schema(output_model)
    for seed in range(60):
        instance = model.generate_instance(schema, random.Random(seed))
        jsonschema.validate(instance, schema)
        # The pydantic model also checks constraints transform_schema moved into descriptions.
        output_model.model_validate(instance)


def test_violation_breaks_the_schema():
    schema = anthropic.transform_schema(Invoice)
    instance = model.generate_instance(schema, random.Random(1))
    broken = model.violate(instance, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_token_formula():
    assert model.text_tokens("") == 0
    assert model.text_tokens("abcd") == 1
    assert model.text_tokens("abcde") == 2
    assert model.text_tokens("é") == 1  # 2 UTF-8 bytes
    params = {
        "model": "claude-haiku-4-5",
        "messages": [{"role": "user", "content": "abcdefgh"}],
        "system": "abcd",
    }
    # 3 request overhead + 1 system + (3 message overhead + 2 text)
    assert model.count_prompt(params).total == 3 + 1 + 3 + 2


def test_answers_are_deterministic_and_depend_on_the_prompt():
    base = {"model": "claude-haiku-4-5", "max_tokens": 500, "messages": [{"role": "user", "content": "one"}]}
    other = {**base, "messages": [{"role": "user", "content": "two"}]}
    assert model.answer(base).content == model.answer(dict(base)).content
    assert model.answer(base).content != model.answer(other).content


def test_small_max_tokens_truncates():
    params = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": [{"role": "user", "content": "long"}]}
    reply = model.answer(params)
    assert reply.stop_reason == "max_tokens"
    assert reply.output_tokens == 3
    assert len(reply.content[0]["text"].encode()) <= 12


def test_prefix_keys_only_match_identical_prefixes():
    def params(system_text):
        return {
            "model": "claude-haiku-4-5",
            "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "q"}],
        }

    a, b, c = (
        model.count_prompt(params("S" * 100)),
        model.count_prompt(params("S" * 100)),
        model.count_prompt(params("T" * 100)),
    )
    assert a.breakpoints[0][1] == b.breakpoints[0][1] != c.breakpoints[0][1]
    assert a.breakpoints[0][0] == 3 + 25
