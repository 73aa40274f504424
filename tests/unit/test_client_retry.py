"""The one retry implementation (lstm_stream.client.retry), in process: what is retried, how long it
waits, and that it stops at the deadline or the attempt limit. The end-to-end behaviour is in
tests/faults/test_client_faults.py and tests/tools/test_loadtest.py."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from devkit.processes import wait_until
from lstm_stream.client.errors import RequestRejected
from lstm_stream.client.retry import RETRYABLE, Budget, RetryPolicy, retry_async

pytestmark = pytest.mark.timeout(30)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=1.0)
    rng = random.Random(1)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        waits = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits), retry
        assert max(waits) - min(waits) > ceiling / 4  # jittered, not one value


def test_retryable_statuses_are_retried_until_success() -> None:
    # CANCELLED too: gRPC core answers it to a call arriving while a draining server closes its port.
    failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED]
    assert set(failures) == RETRYABLE
    seen: list[tuple[object, bool]] = []
    timeouts: list[float] = []

    async def attempt(timeout: float) -> str:
        timeouts.append(timeout)
        if failures:
            raise RequestRejected("no", failures.pop(0))
        return "answer"

    policy = RetryPolicy(deadline_s=10, attempt_timeout_s=2, initial_backoff_s=0.001)
    answer = asyncio.run(retry_async(attempt, policy, on_error=lambda e, again: seen.append((e.code, again))))
    assert answer == "answer" and len(seen) == 5 and all(again for _, again in seen)
    assert all(0 < timeout <= 2 for timeout in timeouts)


def test_other_statuses_and_exhausted_budgets_raise_the_last_error() -> None:
    calls = 0

    async def refused(timeout: float) -> None:
        nonlocal calls
        calls += 1
        raise RequestRejected("bad", grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(RequestRejected):
        asyncio.run(retry_async(refused, RetryPolicy(initial_backoff_s=0.001)))
    assert calls == 1

    async def down(timeout: float) -> None:
        raise RequestRejected("down", grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(RequestRejected):
        asyncio.run(retry_async(down, RetryPolicy(deadline_s=None, max_attempts=3, initial_backoff_s=0.001)))
    started = time.monotonic()
    with pytest.raises(RequestRejected):
        asyncio.run(retry_async(down, RetryPolicy(deadline_s=0.3, attempt_timeout_s=0.1, initial_backoff_s=0.05)))
    assert time.monotonic() - started < 2  # gave up at the deadline


def test_an_attempt_never_outlives_the_deadline() -> None:
    budget = Budget(RetryPolicy(deadline_s=0.05, attempt_timeout_s=10))
    assert budget.attempt_timeout_s() <= 0.05
    wait_until(lambda: budget.remaining_s() <= 0, 5, "the deadline to pass", interval_s=0.01)
    assert budget.next_wait_s() is None
    with pytest.raises(ValueError):
        RetryPolicy(deadline_s=None, max_attempts=None)
