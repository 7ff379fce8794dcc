"""The status vocabulary is the contract between collect, resubmit, publish and the UI."""

from anthropic_batch.status import BatchStatus, FailureClass, RequestStatus, RunMode


def test_request_status_values_are_the_contract():
    assert {s.value for s in RequestStatus} == {
        "succeeded",
        "errored",
        "canceled",
        "expired",
        "invalid_output",
        "needs_followup",
        "missing",
    }
    # str enums compare and serialise as their values (Parquet columns, JSON, XCom).
    assert RequestStatus.SUCCEEDED == "succeeded"
    assert RequestStatus("missing") is RequestStatus.MISSING


def test_failure_class_and_run_mode_values():
    assert [c.value for c in FailureClass] == ["retriable", "permanent", "fatal"]
    assert [m.value for m in RunMode] == ["batch", "sync", "auto"]
    assert RunMode("auto") is RunMode.AUTO


def test_batch_status_is_the_providers_enum():
    from airflow.providers.anthropic.hooks import anthropic as provider

    assert BatchStatus is provider.BatchStatus
    assert BatchStatus.ENDED == "ended"


def test_processing_status_mirrors_the_providers_batch_status():
    from airflow.providers.anthropic.hooks import anthropic as provider

    from anthropic_batch.status import ProcessingStatus

    assert [s.value for s in ProcessingStatus] == [s.value for s in provider.BatchStatus]


def test_result_types_and_count_buckets_are_the_apis():
    from anthropic.types.messages import MessageBatchRequestCounts

    from anthropic_batch.status import (
        ENDED_COUNT_KEYS,
        FAILED_COUNT_KEYS,
        REQUEST_COUNT_KEYS,
        RequestCountKey,
        ResultType,
    )

    assert set(REQUEST_COUNT_KEYS) == set(MessageBatchRequestCounts.model_fields)
    assert [k.value for k in RequestCountKey] == list(REQUEST_COUNT_KEYS)
    assert all(type(k) is str for k in REQUEST_COUNT_KEYS)  # plain dict keys in stored JSON
    assert ENDED_COUNT_KEYS == ("succeeded", "errored", "canceled", "expired")
    assert FAILED_COUNT_KEYS == ("errored", "canceled", "expired")
    assert {t.value for t in ResultType} == set(ENDED_COUNT_KEYS)


def test_error_type_sets_and_sdk_exceptions():
    import anthropic

    from anthropic_batch import results, sync_runner
    from anthropic_batch.status import (
        FATAL_ERROR_TYPES,
        RETRIABLE_ERROR_TYPES,
        fatal_api_errors,
        transient_api_errors,
    )

    assert {"api_error", "overloaded_error", "rate_limit_error"} == RETRIABLE_ERROR_TYPES
    assert {"authentication_error", "permission_error", "billing_error"} == FATAL_ERROR_TYPES
    assert results.RETRIABLE_ERROR_TYPES is RETRIABLE_ERROR_TYPES  # one definition, re-exported
    assert results.FATAL_ERROR_TYPES is FATAL_ERROR_TYPES
    # The synchronous runner names the error types of the status codes it maps, from the same set.
    assert {sync_runner._type_for_status(code) for code in (429, 500, 529)} == RETRIABLE_ERROR_TYPES
    assert anthropic.OverloadedError in transient_api_errors() or issubclass(
        anthropic.OverloadedError, transient_api_errors()
    )
    assert set(fatal_api_errors()) == {
        anthropic.AuthenticationError,
        anthropic.PermissionDeniedError,
        anthropic.PaymentRequiredError,
    }


# The words of the status vocabulary. A string literal spelling one of them anywhere in the library,
# outside an Enum class body, is a status that bypasses status.py (the layering tool's check).
_STATUS_WORDS = {
    "ended",
    "succeeded",
    "errored",
    "canceled",
    "expired",
    "in_progress",
    "canceling",
    "invalid_output",
    "needs_followup",
    "missing",
    "processing",
}


def _bare_status_literals(source: str) -> list[tuple[int, str]]:
    import ast

    tree = ast.parse(source)
    in_enum: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any("Enum" in ast.unparse(b) for b in node.bases):
            in_enum.update(id(x) for x in ast.walk(node))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if id(node) not in in_enum
        and isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in _STATUS_WORDS
    ]


def test_the_scan_finds_a_bare_status_literal():
    assert _bare_status_literals('if batch.processing_status == "ended":\n    pass\n') == [(1, "ended")]
    assert _bare_status_literals('class S(StrEnum):\n    ENDED = "ended"\n') == []


def test_no_bare_status_literal_in_the_library():
    from pathlib import Path

    package = Path(__file__).resolve().parents[3] / "plugins" / "anthropic_batch"
    found = {
        f"{path.relative_to(package)}:{line}": word
        for path in sorted(package.rglob("*.py"))
        for line, word in _bare_status_literals(path.read_text())
    }
    assert not found, f"status words spelled as literals (use anthropic_batch.status): {found}"
