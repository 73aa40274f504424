"""Fixtures shared by every folder: one real redis-server per session, real lstm-serve processes, real gRPC.

The folders: unit/ (no processes: rules, records, conversions, configuration, client pieces) and one
folder per subject of integration tests (model, serving, redis, faults, security, topologies, packaging,
tools). The processes and helpers come from devkit/, shared with bench/ and scripts/.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# lstm-serve processes that tests start by hand (not through ServerProcess, which picks a free HTTP port) would
# all take the default --http-port 8000 and collide: off for them, unless a test says otherwise.
os.environ.setdefault("LSTM_SERVE_HTTP_PORT", "0")

from devkit.processes import NO_WARMUP, RedisServer, ServerProcess
from devkit.server_forks import ServerForks
from server.config import DEFAULT_MODEL

# The longest files first. `--dist loadfile` hands each xdist worker a whole file at a time, in collection
# order (--no-loadscope-reorder in pyproject.toml: xdist's own order, most tests first, left the slowest
# files, which have few tests, for the end, and one worker finished a minute and more before the other).
# Longest first, the last files to start are short ones and both workers finish together. The seconds of
# each file, summed over its tests, are in durations.json; `pytest --store-durations` writes those of the
# files it ran. A file not named there (a new one) runs first: its cost is unknown.
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="write each file's seconds (set-up, call and teardown of its tests) to tests/durations.json")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.nodeid.split("::")[0], len(first_seen))

    def cost(item: pytest.Item) -> tuple[float, int]:
        path = item.nodeid.split("::")[0]
        return -seconds.get(path, float("inf")), first_seen[path]

    items.sort(key=cost)  # stable: a file's tests keep their order


_ran_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _ran_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    # On the controller only (an xdist worker has `workerinput`): it sees every worker's reports.
    if session.config.getoption("store_durations") and not hasattr(session.config, "workerinput"):
        seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        seconds.update({path: round(total, 1) for path, total in _ran_seconds.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(seconds.items())), indent=0) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _servers_forked() -> Iterator[None]:
    """Each worker's ServerProcess servers are forked from one process that imported the server once
    (devkit/server_forks.py: TensorFlow's import, most of a start-up, is paid once a worker, not once a server).
    LSTM_TEST_FORK_SERVERS=0 starts each as a fresh process."""
    if not ServerForks.wanted():
        yield
        return
    ServerProcess.forks = forks = ServerForks()
    try:
        yield
    finally:
        ServerProcess.forks = None
        forks.stop()


@pytest.fixture(scope="session", autouse=True)
def _verifiers_kept_warm() -> None:
    """The in-process verified loads (run_load with verify, devkit.loads.VerifiedLoad) of a test worker share
    one verifier process: TensorFlow's start-up is paid once a worker, not once a load. Each run still gets a
    checker of its own, and a reference built and self-checked for its model file and batch."""
    from loadtest.live_verify import keep_verifiers_warm

    keep_verifiers_warm()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


# Shared servers, one per model, started on first use and stopped at the end of the session: a server
# of a test's own costs a start-up (TensorFlow's import, the model's compilation) and is kept for the
# tests that stop, kill, reconfigure or corrupt theirs.

def _serve(redis_server: RedisServer, model: Path | str) -> Iterator[ServerProcess]:
    server = ServerProcess(redis_server.url, model)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_server(redis_server: RedisServer) -> Iterator[ServerProcess]:
    """One server on the default model, shared by the tests that do not stop or reconfigure it."""
    yield from _serve(redis_server, DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_replica(redis_server: RedisServer) -> Iterator[ServerProcess]:
    """default_server's twin on the same Redis: the second replica for tests that send one stream's chunks
    to both and stop neither."""
    yield from _serve(redis_server, DEFAULT_MODEL)


@pytest.fixture(scope="session")
def small_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """devkit.small_models' models, built once: "last_step" (two features, one output row of three per
    chunk) and "gru_stateful" (three features, stateful, a fixed batch of 4 rows)."""
    from devkit.small_models import build_gru_stateful, build_last_step  # Keras: not at collection (tests/unit)

    folder = tmp_path_factory.mktemp("models")
    return {"last_step": build_last_step(folder / "last_step.keras"),
            "gru_stateful": build_gru_stateful(folder / "gru_stateful.keras")}


@pytest.fixture(scope="session")
def last_step_server(redis_server: RedisServer, small_models: dict[str, Path]) -> Iterator[ServerProcess]:
    yield from _serve(redis_server, small_models["last_step"])


@pytest.fixture(scope="session")
def gru_stateful_server(redis_server: RedisServer, small_models: dict[str, Path]) -> Iterator[ServerProcess]:
    yield from _serve(redis_server, small_models["gru_stateful"])


# A test's own server compiles no XLA shapes at start-up (devkit.processes.NO_WARMUP; a test's own
# --warmup-timesteps, given after it, wins). The shared servers above keep the default warm-up.
@pytest.fixture
def start_server(redis_server: RedisServer) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with custom models or flags (after NO_WARMUP); every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*extra: str, model: object = DEFAULT_MODEL, redis_url: str | None = None,
              port: int | None = None) -> ServerProcess:
        server = ServerProcess(redis_url or redis_server.url, model, *NO_WARMUP, *extra,  # type: ignore[arg-type]
                               port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
