"""Helpers shared by the emulator conformance tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import anthropic
import pytest

from batches_emulator.testing import EmulatorProcess

MODEL = "claude-haiku-4-5"


def client_for(emu: EmulatorProcess, **kwargs) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(
        api_key=emu.api_key, base_url=emu.base_url, _strict_response_validation=True, **kwargs
    )


def async_client_for(emu: EmulatorProcess, **kwargs) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(
        api_key=emu.api_key, base_url=emu.base_url, _strict_response_validation=True, **kwargs
    )


def simple_request(custom_id: str, text: str = "hello", **params) -> dict:
    body = {"model": MODEL, "max_tokens": 200, "messages": [{"role": "user", "content": text}]}
    body.update(params)
    return {"custom_id": custom_id, "params": body}


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # poll interval
        delay = min(delay * 1.5, 0.25)


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 20.0):
    def ended():
        batch = client.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    return wait_until(ended, timeout, f"batch {batch_id} to end")


@pytest.fixture
def client(emulator: EmulatorProcess) -> anthropic.Anthropic:
    return client_for(emulator)
