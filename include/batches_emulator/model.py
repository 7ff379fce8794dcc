"""The deterministic stand-in model: validation, token counting and answers.

Everything here is a pure function of the request (plus an explicit seed), so the same prompt always
gets the same answer, the same usage and the same validation verdict. See the package docstring for
the token formula.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

# id -> (display name, release date, context window, max output tokens). The models of the reference
# price table, plus the dated aliases the SDK knows (accepted in requests, not listed).
MODELS: dict[str, tuple[str, str, int, int]] = {
    "claude-opus-5-5": ("Claude Opus 5.5", "2026-09-01T00:00:00Z", 200_000, 64_000),
    "claude-sonnet-5-5": ("Claude Sonnet 5.5", "2026-09-01T00:00:00Z", 200_000, 64_000),
    "claude-haiku-5-5": ("Claude Haiku 5.5", "2026-09-01T00:00:00Z", 200_000, 64_000),
    "claude-opus-5": ("Claude Opus 5", "2026-05-01T00:00:00Z", 200_000, 64_000),
    "claude-sonnet-5": ("Claude Sonnet 5", "2026-05-01T00:00:00Z", 200_000, 64_000),
    "claude-opus-4-8": ("Claude Opus 4.8", "2026-03-01T00:00:00Z", 200_000, 64_000),
    "claude-opus-4-7": ("Claude Opus 4.7", "2026-01-15T00:00:00Z", 200_000, 64_000),
    "claude-opus-4-6": ("Claude Opus 4.6", "2025-12-01T00:00:00Z", 200_000, 64_000),
    "claude-sonnet-4-6": ("Claude Sonnet 4.6", "2025-12-01T00:00:00Z", 200_000, 64_000),
    "claude-opus-4-5": ("Claude Opus 4.5", "2025-11-01T00:00:00Z", 200_000, 64_000),
    "claude-sonnet-4-5": ("Claude Sonnet 4.5", "2025-09-29T00:00:00Z", 200_000, 64_000),
    "claude-haiku-4-5": ("Claude Haiku 4.5", "2025-10-01T00:00:00Z", 200_000, 64_000),
}
MODEL_ALIASES = {
    "claude-haiku-4-5-20251001": "claude-haiku-4-5",
    "claude-opus-4-5-20251101": "claude-opus-4-5",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5",
}

#: Minimum cacheable prompt length per model (tokens): a breakpoint whose prefix is shorter neither
#: writes nor reads the cache (no error). Mirrors ``anthropic_batch.caching`` (the library's dated,
#: overridable table; tests/emulator/test_caching.py keeps the two equal): the emulator stands in for
#: the API and runs without the library on its path. Override with ``--cache-min-tokens``.
CACHE_MIN_TOKENS_AS_OF = "2026-11-30"
CACHE_MIN_TOKENS: dict[str, int] = {
    "claude-opus-5": 512,
    "claude-sonnet-5": 1024,
    "claude-opus-4-8": 1024,
    "claude-opus-4-7": 2048,
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-sonnet-4-6": 1024,
    "claude-sonnet-4-5": 1024,
    "claude-haiku-4-5": 4096,
    "claude-3-5-haiku": 2048,
}
#: Models without a published minimum (claude-*-5-5): the largest known one.
DEFAULT_CACHE_MIN_TOKENS = 4096

REQUEST_OVERHEAD_TOKENS = 3
MESSAGE_OVERHEAD_TOKENS = 3
NON_TEXT_BLOCK_TOKENS = 1_000  # images, documents: a flat charge
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
VERSION_WITHOUT_SAMPLING = "2026-10-21"

_WORDS = [
    "alpha",
    "amber",
    "anchor",
    "arrow",
    "atlas",
    "basin",
    "beacon",
    "birch",
    "canyon",
    "cedar",
    "cinder",
    "cobalt",
    "comet",
    "coral",
    "crystal",
    "delta",
    "drift",
    "ember",
    "falcon",
    "fern",
    "fjord",
    "flint",
    "galaxy",
    "garnet",
    "glacier",
    "granite",
    "harbor",
    "hazel",
    "horizon",
    "indigo",
    "island",
    "jade",
    "juniper",
    "kelp",
    "lagoon",
    "lantern",
    "lichen",
    "lumen",
    "maple",
    "meadow",
    "mesa",
    "nectar",
    "nimbus",
    "oasis",
    "onyx",
    "orchid",
    "pebble",
    "pine",
    "prairie",
    "quartz",
    "quill",
    "raven",
    "reef",
    "ridge",
    "river",
    "saffron",
    "sage",
    "sierra",
    "spruce",
    "summit",
    "thistle",
    "tide",
    "timber",
    "topaz",
    "tundra",
    "umber",
    "valley",
    "velvet",
    "willow",
    "zephyr",
]


class RequestInvalid(Exception):
    """A request the model refuses; `error_type` is the API error type, the message is the reason."""

    def __init__(self, message: str, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.error_type = error_type


def text_tokens(text: str) -> int:
    """The emulator's tokenizer: one token per started 4 bytes of UTF-8."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_tokens(value: Any) -> int:
    return math.ceil(len(canonical(value).encode("utf-8")) / 4)


def cache_min_tokens(model_id: str, overrides: dict[str, int] | None = None) -> int:
    """The minimum cacheable prefix of a (resolved) model: ``overrides`` ("*" = every model) first."""
    overrides = overrides or {}
    for table in (overrides, CACHE_MIN_TOKENS):
        if model_id in table:
            return table[model_id]
        if table is overrides and "*" in overrides:
            return overrides["*"]
    return DEFAULT_CACHE_MIN_TOKENS


def resolve_model(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    name = MODEL_ALIASES.get(name, name)
    return name if name in MODELS else None


# ---------------------------------------------------------------- token counting and caching


@dataclass
class PromptTokens:
    total: int
    # (cumulative tokens up to and including the breakpoint, prefix key, ttl seconds) per breakpoint
    breakpoints: list[tuple[int, str, int]] = field(default_factory=list)


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return text_tokens(block)
    if not isinstance(block, dict):
        return json_tokens(block)
    kind = block.get("type")
    if kind == "text":
        return text_tokens(str(block.get("text", "")))
    if kind == "tool_use":
        return text_tokens(str(block.get("name", ""))) + json_tokens(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            return sum(_block_tokens(b) for b in content)
        return text_tokens(str(content))
    if kind in ("image", "document"):
        return NON_TEXT_BLOCK_TOKENS
    return json_tokens(block)


def _ttl(block: Any) -> int | None:
    if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
        return 3600 if block["cache_control"].get("ttl") == "1h" else 300
    return None


def count_prompt(params: dict[str, Any]) -> PromptTokens:
    """Count input tokens in prompt order (schema, tools, system, messages) and note cache breakpoints.

    The prefix key of a breakpoint hashes the model and every prompt part up to it, so it only
    matches when the whole prefix repeats exactly.
    """
    parts: list[tuple[Any, int]] = []
    fmt = _output_format(params)
    if fmt is not None:
        parts.append(({"output_schema": fmt.get("schema")}, json_tokens(fmt.get("schema", {}))))
    for tool in params.get("tools") or []:
        parts.append((tool, json_tokens(tool)))
    system = params.get("system")
    if isinstance(system, str):
        parts.append((system, text_tokens(system)))
    elif isinstance(system, list):
        parts.extend((block, _block_tokens(block)) for block in system)
    for message in params.get("messages") or []:
        if not isinstance(message, dict):
            continue
        parts.append(({"role": message.get("role")}, MESSAGE_OVERHEAD_TOKENS))
        content = message.get("content")
        if isinstance(content, str):
            parts.append((content, text_tokens(content)))
        elif isinstance(content, list):
            parts.extend((block, _block_tokens(block)) for block in content)
    total = REQUEST_OVERHEAD_TOKENS + sum(tokens for _, tokens in parts)
    ttls = [_ttl(part) for part, _ in parts]
    # Automatic caching: a top-level cache_control puts a breakpoint on the last cacheable block
    # (the last content block of the last message), with the request's TTL.
    automatic = _ttl(params)
    if automatic is not None:
        last = max((i for i, (part, _) in enumerate(parts) if not _is_role(part)), default=None)
        if last is not None and ttls[last] is None:
            ttls[last] = automatic
    if all(ttl is None for ttl in ttls):
        return PromptTokens(total)
    hasher = hashlib.sha256(str(resolve_model(params.get("model")) or params.get("model")).encode())
    running = REQUEST_OVERHEAD_TOKENS
    breakpoints: list[tuple[int, str, int]] = []
    for (part, tokens), ttl in zip(parts, ttls, strict=True):
        running += tokens
        # The key ignores cache_control itself: the same prefix hits whether it was marked by a
        # block breakpoint or by automatic caching.
        hasher.update(canonical(_without_cache_control(part)).encode("utf-8"))
        if ttl is not None:
            breakpoints.append((running, hasher.copy().hexdigest(), ttl))
    return PromptTokens(total, breakpoints)


def _is_role(part: Any) -> bool:
    return isinstance(part, dict) and set(part) == {"role"}


def _without_cache_control(part: Any) -> Any:
    if isinstance(part, dict) and "cache_control" in part:
        return {k: v for k, v in part.items() if k != "cache_control"}
    return part


# ---------------------------------------------------------------- validation


def _output_format(params: dict[str, Any]) -> dict[str, Any] | None:
    config = params.get("output_config")
    if isinstance(config, dict) and isinstance(config.get("format"), dict):
        return config["format"]
    return None


def validate_params(params: Any, *, api_version: str, in_batch: bool) -> tuple[str, PromptTokens]:
    """Check a Messages request; return the resolved model id and prompt count, or raise RequestInvalid."""
    if not isinstance(params, dict):
        raise RequestInvalid("params: Input should be an object")
    model = resolve_model(params.get("model"))
    if model is None:
        if in_batch:
            raise RequestInvalid(f"model: {params.get('model')!r} is not a known model")
        raise RequestInvalid(f"model: {params.get('model')}", error_type="not_found_error")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise RequestInvalid("max_tokens: Field required (an integer)")
    if max_tokens < 1:
        raise RequestInvalid("max_tokens: must be greater than or equal to 1")
    if max_tokens > MODELS[model][3]:
        raise RequestInvalid(
            f"max_tokens: {max_tokens} > {MODELS[model][3]}, which is the maximum allowed for {model}"
        )
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestInvalid("messages: at least one message is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RequestInvalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if not isinstance(message.get("content"), str | list):
            raise RequestInvalid(f"messages.{i}.content: Field required")
    if params.get("stream"):
        if in_batch:
            raise RequestInvalid("stream: streaming is not supported in the Message Batches API")
        raise RequestInvalid("stream: the emulator does not stream; use stream=false")
    if in_batch and params.get("speed") == "fast":
        raise RequestInvalid("speed: fast mode is not supported in the Message Batches API")
    if in_batch and api_version == VERSION_WITHOUT_SAMPLING:
        for name in SAMPLING_PARAMS:
            if name in params:
                raise RequestInvalid(
                    f"{name}: not supported for batch requests with anthropic-version {api_version}"
                )
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        if name in params and not (isinstance(params[name], int | float) and low <= params[name] <= high):
            raise RequestInvalid(f"{name}: must be a number between {low} and {high}")
    fmt = _output_format(params)
    if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
        raise RequestInvalid("output_config.format: expected {'type': 'json_schema', 'schema': {...}}")
    tools = params.get("tools") or []
    if not isinstance(tools, list):
        raise RequestInvalid("tools: Input should be a list")
    choice = params.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        names = [t.get("name") for t in tools if isinstance(t, dict)]
        if choice.get("name") not in names:
            raise RequestInvalid(f"tool_choice: tool {choice.get('name')!r} is not in tools")
    if isinstance(choice, dict) and choice.get("type") in ("tool", "any") and not tools:
        raise RequestInvalid("tool_choice: requires tools")
    prompt = count_prompt(params)
    if prompt.total > MODELS[model][2]:
        raise RequestInvalid(f"prompt is too long: {prompt.total} tokens > {MODELS[model][2]} maximum")
    return model, prompt


# ---------------------------------------------------------------- answers


def _content_seed(params: dict[str, Any]) -> str:
    keys = ("model", "system", "messages", "tools", "tool_choice", "output_config")
    return hashlib.sha256(canonical({k: params.get(k) for k in keys}).encode("utf-8")).hexdigest()


def _last_user_text(params: dict[str, Any]) -> str:
    for message in reversed(params.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return " ".join(texts)
    return ""


_WORD_BY_BYTE = [_WORDS[b % len(_WORDS)] for b in range(256)]


def _prose(seed: str, params: dict[str, Any]) -> str:
    # Bytes of a hash stream pick the words: much cheaper than seeding a Mersenne Twister per answer.
    stream = hashlib.shake_256(seed.encode()).digest(41)
    words = " ".join(map(_WORD_BY_BYTE.__getitem__, stream[1 : 13 + stream[0] % 29]))
    topic = " ".join(_last_user_text(params).split()[:8])
    return f'Emulated answer about "{topic}": {words}.'


def _split_top_level(text: str) -> list[str]:
    """Split 'a: 1, b: [x, y]' on commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _constraints(schema: dict[str, Any]) -> dict[str, Any]:
    """Schema keywords, including those transform_schema moved into the description as '{k: v}'."""
    found: dict[str, Any] = {}
    description = schema.get("description")
    if isinstance(description, str) and description.rstrip().endswith("}"):
        block = description.rstrip().rsplit("\n\n", 1)[-1]
        if block.startswith("{"):
            for item in _split_top_level(block[1:-1]):
                key, sep, raw = item.partition(":")
                if sep and key.strip().isidentifier():
                    found[key.strip()] = _literal(raw.strip())
    found.update(schema)
    return found


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 50:
        node: Any = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            if part:
                node = node[part.replace("~1", "/").replace("~0", "~")]
        schema = node
        seen += 1
    return schema


def _gen_string(rng: random.Random, c: dict[str, Any]) -> str:
    fmt = c.get("format")
    if fmt == "date-time":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z"
    if fmt == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    if fmt == "email":
        return f"{rng.choice(_WORDS)}@example.com"
    if fmt in ("uri", "url"):
        return f"https://example.com/{rng.choice(_WORDS)}"
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    low = int(c.get("minLength", 1))
    high = int(c.get("maxLength", max(low, 40)))
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    while len(text) < low:
        text += " " + rng.choice(_WORDS)
    return text[:high]


def _gen_number(rng: random.Random, c: dict[str, Any], integer: bool) -> int | float:
    low = c.get("minimum")
    high = c.get("maximum")
    if isinstance(c.get("exclusiveMinimum"), int | float):
        low = c["exclusiveMinimum"] + (1 if integer else 1e-6)
    if isinstance(c.get("exclusiveMaximum"), int | float):
        high = c["exclusiveMaximum"] - (1 if integer else 1e-6)
    low = low if isinstance(low, int | float) else (0 if high is None else min(0, high - 100))
    high = high if isinstance(high, int | float) else low + 100
    if integer:
        return rng.randint(math.ceil(low), math.floor(high))
    value = round(rng.uniform(low, high), 2)
    return min(max(value, low), high)


def generate_instance(schema: Any, rng: random.Random, root: Any = None, depth: int = 0) -> Any:
    """A value that validates against `schema` (the JSON Schema subset structured outputs accept)."""
    root = schema if root is None else root
    if schema is True or not isinstance(schema, dict):
        return rng.choice(_WORDS)
    schema = _resolve(schema, root)
    c = _constraints(schema)
    if "const" in c:
        return c["const"]
    if isinstance(c.get("enum"), list) and c["enum"]:
        return rng.choice(c["enum"])
    for key in ("anyOf", "oneOf"):
        options = c.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if _resolve(o, root).get("type") != "null"]
            if len(non_null) < len(options) and (depth > 4 or not non_null or rng.random() < 0.2):
                return None
            # The first alternative, as a model would mostly pick (Decimal is number-or-string, say).
            return generate_instance(non_null[0], rng, root, depth + 1)
    if c.get("nullable") is True and rng.random() < 0.2:
        return None
    if isinstance(c.get("allOf"), list) and c["allOf"]:
        merged: dict[str, Any] = {}
        for part in c["allOf"]:
            merged.update(_resolve(part, root))
        return generate_instance(merged, rng, root, depth + 1)
    kind = c.get("type")
    if isinstance(kind, list):
        concrete = [k for k in kind if k != "null"]
        kind = rng.choice(concrete) if concrete else "null"
    if kind is None:
        kind = "object" if "properties" in c else "array" if "items" in c else "string"
    if kind == "object":
        required = set(c.get("required") or [])
        result = {}
        for name, sub in (c.get("properties") or {}).items():
            if name in required or (depth < 4 and rng.random() < 0.5):
                result[name] = generate_instance(sub, rng, root, depth + 1)
        return result
    if kind == "array":
        low = int(c.get("minItems", 0 if depth > 3 else 1))
        high = int(c.get("maxItems", low + 3))
        count = low if depth > 3 else rng.randint(low, max(low, high))
        items = c.get("items", {})
        prefix = c.get("prefixItems") if isinstance(c.get("prefixItems"), list) else []
        count = max(count, len(prefix)) if "maxItems" not in c else count
        values = [
            generate_instance(prefix[k] if k < len(prefix) else items, rng, root, depth + 1)
            for k in range(count)
        ]
        if c.get("uniqueItems"):
            unique: list[Any] = []
            for value in values:
                if value not in unique:
                    unique.append(value)
            values = unique
        return values
    if kind == "string":
        return _gen_string(rng, c)
    if kind == "integer":
        return _gen_number(rng, c, integer=True)
    if kind == "number":
        return _gen_number(rng, c, integer=False)
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def violate(instance: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """Break a valid instance: drop a required property, else hand back the wrong type."""
    schema = _resolve(schema, root or schema)
    required = schema.get("required") or []
    if isinstance(instance, dict) and required:
        broken = dict(instance)
        broken.pop(required[0], None)
        return broken
    return [] if not isinstance(instance, list) else {"unexpected": True}


@dataclass
class Answer:
    content: list[dict[str, Any]]
    stop_reason: str
    output_tokens: int
    seed: str = ""
    stop_sequence: str | None = None


def _truncate(text: str, max_tokens: int) -> str:
    return text.encode("utf-8")[: max_tokens * 4].decode("utf-8", errors="ignore")


def answer(params: dict[str, Any], *, invalid_output: bool = False, truncate: bool = False) -> Answer:
    """The deterministic reply to a valid request. `truncate` forces a max_tokens stop."""
    seed = _content_seed(params)
    max_tokens = int(params["max_tokens"])
    choice = params.get("tool_choice") if isinstance(params.get("tool_choice"), dict) else {}
    tools = [t for t in params.get("tools") or [] if isinstance(t, dict)]
    forced = None
    if choice.get("type") == "tool":
        forced = next(t for t in tools if t.get("name") == choice.get("name"))
    elif choice.get("type") == "any" and tools:
        forced = tools[0]
    if forced is not None:
        schema = forced.get("input_schema") or {"type": "object"}
        value = generate_instance(schema, random.Random(int(seed[:16], 16)))
        if invalid_output:
            value = violate(value, schema)
        block = {
            "type": "tool_use",
            "id": "toolu_" + seed[:24],
            "name": forced.get("name"),
            "input": value,
        }
        tokens = text_tokens(str(forced.get("name"))) + json_tokens(value)
        if truncate or tokens > max_tokens:
            # A cut-off tool call has no usable input; the API then returns what text it had.
            return Answer(
                [{"type": "text", "text": _truncate(canonical(value), max_tokens)}],
                "max_tokens",
                max_tokens,
                seed,
            )
        return Answer([block], "tool_use", tokens, seed)
    fmt = _output_format(params)
    if fmt is not None:
        schema = fmt["schema"]
        value = generate_instance(schema, random.Random(int(seed[:16], 16)))
        if invalid_output:
            value = violate(value, schema)
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = _prose(seed, params)
    stops = [s for s in params.get("stop_sequences") or [] if isinstance(s, str) and s and s in text]
    if stops:
        first = min(stops, key=text.index)
        text = text[: text.index(first)]
        tokens = text_tokens(text)
        if tokens <= max_tokens and not truncate:
            return Answer([{"type": "text", "text": text}], "stop_sequence", tokens, seed, first)
    tokens = text_tokens(text)
    if truncate or tokens > max_tokens:
        cut = min(max_tokens, max(tokens - 1, 1)) if truncate else max_tokens
        return Answer([{"type": "text", "text": _truncate(text, cut)}], "max_tokens", cut, seed)
    return Answer([{"type": "text", "text": text}], "end_turn", tokens, seed)


def message_id(seed_text: str) -> str:
    return "msg_" + hashlib.sha256(seed_text.encode()).hexdigest()[:24]
