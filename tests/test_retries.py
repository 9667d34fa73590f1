"""retries: transient read errors are tried again, bounded; others are raised at once."""

from __future__ import annotations

import errno

import pytest

from xr_datamodule import retries


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(retries, "RETRY_BASE_SECONDS", 0.0)


def flaky(failures: list[BaseException]):
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "read"

    return call, calls


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError("peer"),
        TimeoutError("slow"),
        OSError(errno.ETIMEDOUT, "timed out"),
        RuntimeError("503 Service Unavailable"),
    ],
)
def test_transient_errors_are_tried_again(error, caplog):
    call, calls = flaky([error, error])
    with caplog.at_level("WARNING"):
        assert retries.retrying(call, "chunk t/0.0") == "read"
    assert len(calls) == 3
    assert caplog.text.count("reading chunk t/0.0 failed") == 2


@pytest.mark.parametrize(
    "error", [FileNotFoundError("t/0.0"), PermissionError("denied"), ValueError("corrupt")]
)
def test_other_errors_are_raised_at_once(error):
    call, calls = flaky([error])
    with pytest.raises(type(error)):
        retries.retrying(call, "chunk")
    assert len(calls) == 1


def test_retries_are_bounded():
    call, calls = flaky([ConnectionResetError("peer")] * (retries.READ_RETRIES + 5))
    with pytest.raises(ConnectionResetError):
        retries.retrying(call, "chunk")
    assert len(calls) == retries.READ_RETRIES + 1


def test_a_wrapped_network_error_is_transient_but_a_wrapped_missing_file_is_not():
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as inner:
            raise RuntimeError("the store failed") from inner
    except RuntimeError as outer:
        assert retries.is_transient(outer)
    try:
        try:
            raise FileNotFoundError("t/0.0")
        except FileNotFoundError as inner:
            raise RuntimeError("the store failed") from inner
    except RuntimeError as outer:
        assert not retries.is_transient(outer)
