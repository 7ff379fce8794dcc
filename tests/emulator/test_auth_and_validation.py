"""Auth styles, version headers, create-time validation and asynchronous per-request validation."""

from __future__ import annotations

import anthropic
import httpx2
import pytest

from tests.emulator.conftest import MODEL, client_for, simple_request, wait_ended

OLD_VERSION = "2023-06-01"


def test_bearer_is_what_the_sdk_sends_and_works(emulator):
    client = client_for(emulator)
    assert client.auth_headers["Authorization"] == f"Bearer {emulator.api_key}"
    assert client.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"


def test_x_api_key_and_old_version_header(emulator):
    response = httpx2.get(
        f"{emulator.base_url}/v1/messages/batches?limit=1",
        headers={"x-api-key": emulator.api_key, "anthropic-version": OLD_VERSION},
    )
    assert response.status_code == 200
    assert set(response.json()) == {"data", "has_more", "first_id", "last_id"}


def test_sdk_with_old_version_header(emulator):
    client = client_for(emulator, default_headers={"anthropic-version": OLD_VERSION})
    batch = client.messages.batches.create(requests=[simple_request("v1", temperature=0.2)])
    ended = wait_ended(client, batch.id)
    # temperature is fine under 2023-06-01 ...
    assert ended.request_counts.succeeded == 1


def test_sampling_params_rejected_in_batches_under_new_version(client):
    batch = client.messages.batches.create(
        requests=[
            simple_request("t", temperature=0.2),
            simple_request("p", top_p=0.9),
            simple_request("k", top_k=5),
            simple_request("ok"),
        ]
    )
    wait_ended(client, batch.id)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["ok"].type == "succeeded"
    for custom_id in "tpk":
        assert results[custom_id].type == "errored"
        assert results[custom_id].error.error.type == "invalid_request_error"
    # ... and the synchronous API still accepts temperature.
    assert client.messages.create(
        model=MODEL,
        max_tokens=50,
        extra_body={"temperature": 0.3},
        messages=[{"role": "user", "content": "x"}],
    ).content


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong-key"},
        {"authorization": "Bearer wrong-key"},
    ],
)
def test_missing_or_wrong_key_is_401(emulator, headers):
    response = httpx2.get(
        f"{emulator.base_url}/v1/messages/batches", headers={"anthropic-version": OLD_VERSION, **headers}
    )
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert body["request_id"] == response.headers["request-id"]


def test_sdk_raises_authentication_error(emulator):
    client = anthropic.Anthropic(api_key="not-the-key", base_url=emulator.base_url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.batches.list()


def test_unknown_version_is_rejected(emulator):
    client = client_for(emulator, default_headers={"anthropic-version": "1999-01-01"})
    with pytest.raises(anthropic.BadRequestError, match="anthropic-version"):
        client.models.list()


def test_extra_keys_are_accepted(emulator_factory):
    emu = emulator_factory("--api-key", "second-key")
    for key in (emu.api_key, "second-key"):
        assert anthropic.Anthropic(api_key=key, base_url=emu.base_url).models.list().data


def test_beta_query_parameter_is_ignored(client):
    batch = client.beta.messages.batches.create(requests=[simple_request("b1")])
    assert client.beta.messages.batches.retrieve(batch.id).id == batch.id
    assert batch.id in [b.id for b in client.beta.messages.batches.list(limit=5).data]


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ([simple_request("has space")], "custom_id"),
        ([simple_request("x" * 65)], "custom_id"),
        ([simple_request("")], "custom_id"),
        ([simple_request("dup"), simple_request("dup")], "duplicate"),
        ([], "1 to 100000"),
    ],
)
def test_create_time_validation(client, requests, match):
    with pytest.raises(anthropic.BadRequestError, match=match):
        client.messages.batches.create(requests=requests)


def test_more_than_100000_requests_is_400(client):
    # Compact requests: the body is refused before anything is stored.
    tiny = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    requests = [{"custom_id": str(i), "params": tiny} for i in range(100_001)]
    with pytest.raises(anthropic.BadRequestError, match="1 to 100000"):
        client.messages.batches.create(requests=requests)


def test_body_over_the_limit_is_413(emulator_factory):
    emu = emulator_factory("--max-body-bytes", "4000")
    client = client_for(emu)
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.batches.create(requests=[simple_request(f"big{i}", "y" * 100) for i in range(40)])
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"
    assert client.messages.batches.list().data == []
    assert client.messages.batches.create(requests=[simple_request("small")]).id


def test_bad_params_come_back_as_errored_results(client):
    long_prompt = "w" * (4 * 200_001)
    batch = client.messages.batches.create(
        requests=[
            simple_request("good"),
            simple_request("stream", stream=True),
            simple_request("zero", max_tokens=0),
            simple_request("model", model="claude-nonexistent-1"),
            simple_request("long", long_prompt),
            simple_request("fast", speed="fast"),
        ]
    )
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.succeeded == 1
    assert ended.request_counts.errored == 5
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["good"].type == "succeeded"
    reasons = {cid: r.error.error.message for cid, r in results.items() if r.type == "errored"}
    assert all(r.error.error.type == "invalid_request_error" for r in results.values() if r.type == "errored")
    assert "stream" in reasons["stream"]
    assert "max_tokens" in reasons["zero"]
    assert "model" in reasons["model"]
    assert "prompt is too long" in reasons["long"]
    assert "fast" in reasons["fast"]


def test_sync_messages_validate_synchronously(client):
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list(limit=3)]  # auto-paginates
    assert {"claude-opus-5-5", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-8"} <= set(ids)
    assert len(ids) == len(set(ids))
    info = client.models.retrieve("claude-sonnet-4-6")
    assert info.display_name == "Claude Sonnet 4.6" and info.type == "model"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("gpt-4")


def test_unknown_route_is_a_json_404(emulator):
    response = httpx2.get(
        f"{emulator.base_url}/v1/nothing",
        headers={"x-api-key": emulator.api_key, "anthropic-version": OLD_VERSION},
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_max_requests_flag(emulator_factory):
    client = client_for(emulator_factory("--max-requests", "3"))
    with pytest.raises(anthropic.BadRequestError, match="1 to 3"):
        client.messages.batches.create(requests=[simple_request(f"m{i}") for i in range(4)])
    assert client.messages.batches.create(requests=[simple_request(f"m{i}") for i in range(3)]).id
