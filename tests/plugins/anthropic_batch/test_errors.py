"""One exception base for the library (errors.AnthropicBatchError)."""

import importlib
import inspect
import pkgutil

import pytest

import anthropic_batch
from anthropic_batch.errors import AnthropicBatchError

# The Batches page's HTTP control flow (mapped to status codes inside the app), not library errors.
UI_INTERNAL = {"NotAuthenticated", "Forbidden", "RunNotFound", "CancelRefused"}


def _library_exceptions() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(anthropic_batch.__path__, "anthropic_batch."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
                and name not in UI_INTERNAL
            ):
                found.append(obj)
    return found


def test_every_library_exception_derives_from_the_base():
    found = _library_exceptions()
    assert len(found) >= 13
    assert [e.__name__ for e in found if not issubclass(e, AnthropicBatchError)] == []


@pytest.mark.parametrize(
    ("module", "name", "builtin"),
    [
        ("anthropic_batch.batch_requests", "BatchRequestError", ValueError),
        ("anthropic_batch.pipeline_config", "PipelineConfigError", ValueError),
        ("anthropic_batch.pricing", "UnknownModelError", KeyError),
        ("anthropic_batch.ledger", "LostClaimError", RuntimeError),
        ("anthropic_batch.hooks", "AmbiguousCreateError", RuntimeError),
    ],
)
def test_errors_keep_the_builtin_their_callers_catch(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, builtin) and issubclass(cls, AnthropicBatchError)
