"""Fixtures: one real redis-server per session, real lstm-serve processes, real gRPC channels."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tests.support import DEFAULT_MODEL, RedisServer, ServerProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_server(redis_server: RedisServer) -> Iterator[ServerProcess]:
    """One server on the default model, shared by the tests that do not stop or reconfigure it."""
    server = ServerProcess(redis_server.url, DEFAULT_MODEL)
    yield server
    server.stop()


@pytest.fixture
def start_server(redis_server: RedisServer) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with custom models or flags; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*extra: str, model: object = DEFAULT_MODEL, redis_url: str | None = None,
              port: int | None = None) -> ServerProcess:
        server = ServerProcess(redis_url or redis_server.url, model, *extra, port=port)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
