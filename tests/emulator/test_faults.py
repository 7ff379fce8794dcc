"""Every fault flag, seeded and reproducible."""

from __future__ import annotations

import collections
import json

import anthropic
import httpx2
import jsonschema
import pytest

from batches_emulator.testing import EmulatorProcess
from tests.emulator.conftest import MODEL, client_for, simple_request, wait_ended, wait_until

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


def structured(custom_id: str) -> dict:
    return simple_request(
        custom_id,
        f"classify {custom_id}",
        max_tokens=500,
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
    )


def outcomes(client: anthropic.Anthropic, batch_id: str) -> dict[str, str]:
    out = {}
    for r in client.messages.batches.results(batch_id):
        kind = r.result.type
        if kind == "errored":
            kind = r.result.error.error.type
        elif kind == "succeeded":
            message = r.result.message
            kind = message.stop_reason
            if kind == "end_turn":
                try:
                    jsonschema.validate(json.loads(message.content[0].text), SCHEMA)
                    kind = "valid"
                except (ValueError, jsonschema.ValidationError):
                    kind = "invalid"
        out[r.custom_id] = kind
    return out


def run_batch(
    emu: EmulatorProcess, n: int = 200
) -> tuple[anthropic.types.messages.MessageBatch, dict[str, str]]:
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[structured(f"f{i}") for i in range(n)])
    ended = wait_ended(client, batch.id)
    return ended, outcomes(client, batch.id)


def test_result_fault_rates_are_applied_and_counted(emulator_factory):
    emu = emulator_factory(
        "--processing-seconds",
        "0.3",
        "--seed",
        "7",
        "--error-rate",
        "api_error=0.1",
        "--error-rate",
        "overloaded_error=0.1",
        "--error-rate",
        "invalid_request_error=0.05",
        "--invalid-output-rate",
        "0.15",
        "--truncate-rate",
        "0.1",
    )
    ended, by_id = run_batch(emu, 400)
    tally = collections.Counter(by_id.values())
    assert set(tally) == {
        "api_error",
        "overloaded_error",
        "invalid_request_error",
        "invalid",
        "max_tokens",
        "valid",
    }
    for kind, rate in [("api_error", 0.1), ("overloaded_error", 0.1), ("invalid_request_error", 0.05)]:
        assert abs(tally[kind] / 400 - rate) < 0.06, (kind, tally)
    assert (
        ended.request_counts.errored
        == tally["api_error"] + tally["overloaded_error"] + tally["invalid_request_error"]
    )
    assert ended.request_counts.succeeded == 400 - ended.request_counts.errored
    assert ended.request_counts.expired == ended.request_counts.canceled == 0


def test_same_seed_same_faults_different_seed_different(emulator_factory):
    flags = ("--processing-seconds", "0.2", "--error-rate", "api_error=0.3", "--invalid-output-rate", "0.2")
    _, first = run_batch(emulator_factory(*flags, "--seed", "1"), 60)
    _, again = run_batch(emulator_factory(*flags, "--seed", "1"), 60)
    _, other = run_batch(emulator_factory(*flags, "--seed", "2"), 60)
    assert first == again
    assert first != other


def test_expired_rate_runs_the_batch_to_expiry(emulator_factory):
    emu = emulator_factory(
        "--processing-seconds", "0.1", "--expire-after-seconds", "1", "--expired-rate", "0.3"
    )
    ended, by_id = run_batch(emu, 50)
    tally = collections.Counter(by_id.values())
    assert 0 < tally["expired"] < 50
    assert ended.request_counts.expired == tally["expired"]
    assert ended.ended_at == ended.expires_at


def test_http_429_carries_retry_after_ms_and_the_sdk_retries(emulator_factory):
    emu = emulator_factory("--http-fault", "create:429:1.0", "--retry-after-ms", "20")
    with pytest.raises(anthropic.RateLimitError) as info:
        client_for(emu).messages.batches.create(requests=[simple_request("r")])
    assert info.value.response.headers["retry-after-ms"] == "20"
    assert info.value.body["error"]["type"] == "rate_limit_error"

    flaky = emulator_factory("--http-fault", "create:429:0.5", "--retry-after-ms", "1", "--seed", "3")
    client = client_for(flaky, max_retries=10)
    for i in range(4):
        assert client.messages.batches.create(requests=[simple_request(f"ok{i}")]).id
    # Every attempt that got through created exactly one batch.
    assert len(client.messages.batches.list().data) == 4


@pytest.mark.parametrize(
    ("fault", "exception"),
    [
        ("retrieve:500:1.0", anthropic.InternalServerError),
        ("retrieve:529:1.0", anthropic.OverloadedError),
        ("list:403:1.0", anthropic.PermissionDeniedError),
        ("models:402:1.0", anthropic.PaymentRequiredError),
    ],
)
def test_http_faults_map_to_sdk_exceptions(emulator_factory, fault, exception):
    emu = emulator_factory("--http-fault", fault)
    client = client_for(emu)
    call = {
        "retrieve": lambda: client.messages.batches.retrieve("msgbatch_x"),
        "list": lambda: client.messages.batches.list(),
        "models": lambda: client.models.list(),
    }[fault.split(":")[0]]
    with pytest.raises(exception):
        call()


def test_results_fault_only_hits_the_download(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.2", "--http-fault", "results:529:1.0")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request("a")])
    wait_ended(client, batch.id)
    with pytest.raises(anthropic.OverloadedError):
        list(client.messages.batches.results(batch.id))


def test_create_after_fault_creates_the_batch_anyway(emulator_factory):
    emu = emulator_factory("--http-fault", "create_after:500:1.0")
    client = client_for(emu)
    with pytest.raises(anthropic.InternalServerError):
        client.messages.batches.create(requests=[simple_request("orphan")])
    (orphan,) = client.messages.batches.list().data
    assert orphan.request_counts.processing == 1


def test_early_404_after_create(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.2", "--early-404-seconds", "0.7")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request("a")])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)

    def found():
        try:
            return client.messages.batches.retrieve(batch.id)
        except anthropic.NotFoundError:
            return None

    assert wait_until(found, what="batch visible").id == batch.id


def test_first_results_download_is_cut_then_a_retry_succeeds(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.2", "--drop-results-after-lines", "7")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"d{i}") for i in range(25)])
    wait_ended(client, batch.id)
    received = []
    with pytest.raises((httpx2.HTTPError, anthropic.APIConnectionError)):
        for r in client.messages.batches.results(batch.id):
            received.append(r.custom_id)
    # The cut comes after 7 lines; a client may lose the tail of its last read buffer.
    assert 0 < len(received) <= 7
    complete = [r.custom_id for r in client.messages.batches.results(batch.id)]
    assert len(complete) == 25 and complete[: len(received)] == received


def test_sync_message_fault(emulator_factory):
    emu = emulator_factory("--http-fault", "messages:529:1.0", "--http-fault", "count_tokens:500:1.0")
    client = client_for(emu)
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.InternalServerError):
        client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_bad_flags_are_refused():
    import subprocess
    import sys

    from batches_emulator.testing import INCLUDE_DIR

    for flags in (
        ["--error-rate", "nonsense=0.1"],
        ["--http-fault", "create:429"],
        ["--api-key", "sk-ant-abc"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "batches_emulator", *flags],
            cwd=INCLUDE_DIR,
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 2, flags


def test_dropped_stream_ends_inside_a_line(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.1", "--drop-results-after-lines", "3")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"m{i}") for i in range(10)])
    ended = wait_ended(client, batch.id)
    headers = {"x-api-key": emu.api_key, "anthropic-version": "2023-06-01"}
    received = b""
    with (
        pytest.raises(httpx2.RemoteProtocolError),
        httpx2.stream("GET", ended.results_url, headers=headers) as r,
    ):
        for chunk in r.iter_bytes():
            received += chunk
    assert received.count(b"\n") == 3 and not received.endswith(b"\n")
    again = httpx2.get(ended.results_url, headers=headers)
    assert again.content.count(b"\n") == 10 and again.content.startswith(received)


def test_queued_request_limit_is_a_429_until_batches_end(emulator_factory):
    emu = emulator_factory(
        "--processing-seconds", "60", "--cancel-seconds", "0.1", "--max-queued-requests", "5"
    )
    client = client_for(emu)
    first = client.messages.batches.create(requests=[simple_request(f"q{i}") for i in range(4)])
    with pytest.raises(anthropic.RateLimitError, match="queued"):
        client.messages.batches.create(requests=[simple_request("a"), simple_request("b")])
    assert client.messages.batches.create(requests=[simple_request("fits")]).id
    client.messages.batches.cancel(first.id)
    wait_ended(client, first.id)
    assert client.messages.batches.create(requests=[simple_request("c"), simple_request("d")]).id


def test_output_faults_also_hit_synchronous_messages(emulator_factory):
    emu = emulator_factory("--invalid-output-rate", "0.5", "--seed", "11")
    client = client_for(emu)
    kinds = collections.Counter()
    for i in range(40):
        params = structured(f"s{i}")["params"]
        text = client.messages.create(**params).content[0].text
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            kinds["valid"] += 1
        except jsonschema.ValidationError:
            kinds["invalid"] += 1
    assert kinds["valid"] > 5 and kinds["invalid"] > 5
