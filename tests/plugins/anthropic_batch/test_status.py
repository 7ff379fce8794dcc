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
