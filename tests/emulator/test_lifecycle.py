"""Batch lifecycle through the official SDK: processing -> ended, cancel, expiry, archive, delete,
paging, restart persistence, and the async client."""

from __future__ import annotations

import asyncio
import time

import anthropic
import pytest

from tests.emulator.conftest import async_client_for, client_for, simple_request, wait_ended, wait_until


def test_counts_stay_zero_until_the_batch_ends(emulator_factory):
    emu = emulator_factory("--processing-seconds", "2")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"c{i}") for i in range(4)])
    in_progress = client.messages.batches.retrieve(batch.id)
    assert in_progress.processing_status == "in_progress"
    counts = in_progress.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (
        4,
        0,
        0,
        0,
        0,
    )
    assert in_progress.results_url is None and in_progress.ended_at is None
    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
        list(client.messages.batches.results(batch.id))
    ended = wait_ended(client, batch.id)
    counts = ended.request_counts
    assert counts.processing == 0
    assert counts.succeeded + counts.errored + counts.canceled + counts.expired == 4
    assert ended.ended_at >= ended.created_at


def test_cancel_goes_canceling_then_ended_with_canceled_results(emulator_factory):
    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "0.3")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"x{i}") for i in range(5)])
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.processing_status == "canceling"
    assert canceled.cancel_initiated_at is not None
    assert canceled.request_counts.processing == 5
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.canceled == 5
    assert ended.cancel_initiated_at == canceled.cancel_initiated_at
    results = list(client.messages.batches.results(batch.id))
    assert {r.result.type for r in results} == {"canceled"}
    # Canceling an ended batch changes nothing.
    assert client.messages.batches.cancel(batch.id).processing_status == "ended"


def test_unfinished_requests_expire_at_expires_at(emulator_factory):
    # 24 emulated hours pass in 0.5 real seconds; processing would need 5 s, so everything expires.
    emu = emulator_factory("--processing-seconds", "5", "--expire-after-seconds", "0.5")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"e{i}") for i in range(3)])
    ended = wait_ended(client, batch.id)
    assert ended.request_counts.expired == 3
    assert ended.ended_at == ended.expires_at
    assert {r.result.type for r in client.messages.batches.results(batch.id)} == {"expired"}


def test_archived_batches_lose_their_results(emulator_factory):
    # 29 emulated days pass in ~0.8 real seconds.
    emu = emulator_factory("--processing-seconds", "0.001", "--time-scale", "3000000")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request("a1")])
    archived = wait_until(
        lambda: (b := client.messages.batches.retrieve(batch.id)).archived_at and b, what="archive"
    )
    assert archived.processing_status == "ended"
    assert (archived.archived_at - archived.created_at).days == 29
    with pytest.raises(anthropic.NotFoundError, match="archived"):
        list(client.messages.batches.results(batch.id))


def test_delete_only_once_ended(emulator_factory):
    emu = emulator_factory("--processing-seconds", "60", "--cancel-seconds", "0.2")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request("d1")])
    with pytest.raises(anthropic.BadRequestError, match="cannot be deleted"):
        client.messages.batches.delete(batch.id)
    client.messages.batches.cancel(batch.id)
    wait_ended(client, batch.id)
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in client.messages.batches.list()]


def test_unknown_batch_is_404(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.batches.retrieve("msgbatch_doesnotexist")
    assert info.value.body["error"]["type"] == "not_found_error"
    assert info.value.response.headers["request-id"].startswith("req_")
    assert info.value.request_id == info.value.response.headers["request-id"]


def test_paging_newest_first_with_after_and_before(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.2")
    client = client_for(emu)
    ids = [client.messages.batches.create(requests=[simple_request("p")]).id for _ in range(5)]
    newest_first = list(reversed(ids))

    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more is True
    assert (page.first_id, page.last_id) == (newest_first[0], newest_first[1])

    second = client.messages.batches.list(limit=2, after_id=page.last_id)
    assert [b.id for b in second.data] == newest_first[2:4]
    last = client.messages.batches.list(limit=2, after_id=second.last_id)
    assert [b.id for b in last.data] == newest_first[4:]
    assert last.has_more is False

    before = client.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in before.data] == newest_first[1:3]
    assert before.has_more is True

    # SDK auto-pagination walks every page.
    assert [b.id for b in client.messages.batches.list(limit=2)] == newest_first
    assert [b.id for b in client.messages.batches.list(limit=1000)] == newest_first
    for bad in (0, 1001):
        with pytest.raises(anthropic.BadRequestError):
            client.messages.batches.list(limit=bad)


def test_state_survives_a_restart(emulator_factory):
    emu = emulator_factory("--processing-seconds", "0.5")
    client = client_for(emu)
    batch = client.messages.batches.create(requests=[simple_request(f"s{i}", f"t{i}") for i in range(6)])
    emu.restart()
    assert client.messages.batches.retrieve(batch.id).id == batch.id
    wait_ended(client, batch.id)
    before = sorted(
        (r.custom_id, r.result.message.content[0].text) for r in client.messages.batches.results(batch.id)
    )
    emu.restart()
    after = sorted(
        (r.custom_id, r.result.message.content[0].text) for r in client.messages.batches.results(batch.id)
    )
    assert before == after and len(after) == 6
    assert [b.id for b in client.messages.batches.list()] == [batch.id]


async def test_async_client_full_cycle(emulator):
    client = async_client_for(emulator)
    batch = await client.messages.batches.create(requests=[simple_request(f"as{i}") for i in range(3)])
    deadline = time.monotonic() + 20
    while (current := await client.messages.batches.retrieve(batch.id)).processing_status != "ended":
        assert time.monotonic() < deadline, "batch did not end"
        await asyncio.sleep(0.05)  # poll interval
    assert current.request_counts.succeeded == 3
    ids = [b.id async for b in client.messages.batches.list(limit=1)]
    assert batch.id in ids
    results = [r async for r in await client.messages.batches.results(batch.id)]
    assert sorted(r.custom_id for r in results) == ["as0", "as1", "as2"]
    message = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.role == "assistant"
    count = await client.messages.count_tokens(
        model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
    )
    assert count.input_tokens == message.usage.input_tokens
    assert (await client.models.retrieve("claude-opus-4-8")).id == "claude-opus-4-8"
    model_ids = [m.id async for m in client.models.list()]
    assert model_ids[0] == "claude-opus-5-5" and len(model_ids) == 12
    deleted = await client.messages.batches.delete(batch.id)
    assert deleted.type == "message_batch_deleted"
    other = await client.messages.batches.create(requests=[simple_request("later")])
    canceling = await client.messages.batches.cancel(other.id)
    assert canceling.processing_status in ("canceling", "ended")
    await client.close()


def test_results_are_shuffled_and_lines_end_with_newline_only(emulator):
    import httpx2

    client = client_for(emulator)
    batch = client.messages.batches.create(requests=[simple_request(f"o{i:03d}") for i in range(60)])
    ended = wait_ended(client, batch.id)
    raw = httpx2.get(
        ended.results_url, headers={"x-api-key": emulator.api_key, "anthropic-version": "2023-06-01"}
    )
    assert raw.status_code == 200
    assert b"\r" not in raw.content and raw.content.endswith(b"\n")
    ids = [line.split('"')[3] for line in raw.text.splitlines()]
    assert sorted(ids) == [f"o{i:03d}" for i in range(60)]
    assert ids != sorted(ids)  # any order, and in practice not request order
