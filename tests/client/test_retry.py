"""RetryPolicy and the resume loop's decisions: which errors are retried, how long a fetch waits."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest

from weightserve.client.common import ResumeLoop, fetch_args
from weightserve.client.retry import RETRY_AFTER_KEY, RetryPolicy, retry_after
from weightserve.errors import FetchError
from weightserve.v1 import weightserve_pb2 as pb


class _Error(grpc.RpcError):
    """A failed call as grpc raises it: code, details, trailing metadata."""

    def __init__(self, code: grpc.StatusCode, trailing: Sequence[tuple[str, str]] = ()) -> None:
        self._code, self._trailing = code, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"{self._code.name} for a test"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def _loop(policy: RetryPolicy) -> ResumeLoop:
    manifest = pb.GetManifestResponse(
        manifest_id="m", tensors=[pb.TensorInfo(name="a", dtype="F32", shape=[1], nbytes=4)], total_bytes=4
    )
    loop = ResumeLoop(fetch_args("org/x", 0, 1, {}), manifest, policy)
    assert loop.next_request() is not None
    return loop


def test_retry_after_reads_milliseconds_and_ignores_anything_else() -> None:
    assert retry_after([(RETRY_AFTER_KEY, "1500")]) == 1.5
    assert retry_after([("other", "1"), (RETRY_AFTER_KEY, b"20")]) == 0.02
    assert retry_after([(RETRY_AFTER_KEY, "soon")]) is None
    assert retry_after(None) is None and retry_after([]) is None


@pytest.mark.fault("streams over the per-peer or overall limit")
def test_resource_exhausted_is_retried_only_with_a_hint_and_attempts_are_unbounded_by_default() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 10_000)
    assert not policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1)
    assert policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 1, hinted=True)
    assert not policy.should_retry(grpc.StatusCode.INVALID_ARGUMENT, 1)
    assert not RetryPolicy(max_attempts=1).should_retry(grpc.StatusCode.UNAVAILABLE, 1)
    assert policy.backoff(10_000) <= policy.max_backoff
    with pytest.raises(ValueError):
        RetryPolicy(retry_deadline=-1)


def test_a_hinted_delay_is_the_least_wait() -> None:
    loop = _loop(RetryPolicy(initial_backoff=0.01, max_backoff=0.02))
    pause = loop.on_rpc_error(_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, [(RETRY_AFTER_KEY, "2500")]))
    assert pause.floor == 2.5 and pause.limit == 120.0
    assert loop.stats.reconnects == 1


def test_resource_exhausted_without_a_hint_is_final() -> None:
    loop = _loop(RetryPolicy())
    with pytest.raises(FetchError) as caught:
        loop.on_rpc_error(_Error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert loop.stats.reconnects == 0


@pytest.mark.fault("server down longer than the retry deadline")
def test_the_deadline_counts_waits_over_all_breaks() -> None:
    loop = _loop(RetryPolicy(retry_deadline=10.0))
    loop.stats.retry_wait_seconds = 9.5  # earlier breaks
    pause = loop.on_rpc_error(_Error(grpc.StatusCode.UNAVAILABLE))
    assert pause.limit == pytest.approx(0.5) and pause.floor <= 0.5
    with pytest.raises(FetchError) as caught:
        loop.after_pause(ready=False)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "gave up after waiting 9.5s" in str(caught.value) and "retry_deadline 10s" in str(caught.value)

    loop.stats.retry_wait_seconds = 10.0
    with pytest.raises(FetchError, match="gave up"):
        loop.on_rpc_error(_Error(grpc.StatusCode.UNAVAILABLE))
