"""Real processes for the tests: a redis-server on a free loopback port and lstm-serve subprocesses."""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL  # the model the server serves by default; re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll until condition() is truthy; fail the test with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """A private redis-server on a free loopback port, data in a temporary folder."""

    def __init__(self, appendonly: bool = True, password: str | None = None, appendfsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run ./scripts/test, which installs it")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lstm-redis-")
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self._command = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync, "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]
        if password:
            # In a config file: on the command line `ps` would show it.
            config = os.path.join(self.dir, "redis.conf")
            with open(config, "w") as handle:
                handle.write(f"requirepass {password}\n")
            os.chmod(config, 0o600)
            self._command.insert(1, config)
        self.process: subprocess.Popen | None = None
        self.started_by = os.environ.get("PYTEST_CURRENT_TEST", " ".join(sys.argv))
        _STARTED.append(self)
        self.start()

    def start(self) -> None:
        if self.process and self.process.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running: stop or kill it first")
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


_STARTED: list[RedisServer] = []


@atexit.register
def _kill_leftover_redis() -> None:
    """No private redis-server outlives the process that started it; one still running at exit is a test
    that forgot to stop it, named on stderr so it can be fixed."""
    for server in _STARTED:
        if server.process and server.process.poll() is None:
            print(f"tests/support.py: redis-server on port {server.port} was still running at exit, started by "
                  f"{server.started_by}; killed", file=sys.stderr)
            server.process.send_signal(signal.SIGCONT)  # a paused one would not die
            server.kill()


def serve_until_exit(*flags: str) -> subprocess.CompletedProcess[str]:
    """lstm-serve run to its exit, for the start-up refusals (exit code 2 and one line saying what to change)."""
    command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--log-format", "text", *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


class ServerProcess:
    """`python -m server` on a free port, ready once its health check says SERVING."""

    def __init__(self, redis_url: str | None, model: Path | str = DEFAULT_MODEL, *extra: str,
                 port: int | None = None, ready_timeout_s: float = 90,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """`redis_url` None: `extra` names it (--redis-url-file); `credentials`: the server serves TLS."""
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="lstm-serve-", suffix=".log")[1])
        command = [
            sys.executable, "-m", "server", "--model", str(model), "--port", str(self.port),
            *(("--redis-url", redis_url) if redis_url else ()), "--redis-autostart", "false", "--log-format", "json",
            "--metrics-port", str(self.metrics_port),
            # No load balancer to wait for in tests: stop promptly (extra flags may set it again).
            "--drain-delay-s", "0", *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.channel = grpc.secure_channel(self.address, credentials) if credentials else grpc.insecure_channel(
            self.address)
        self.stub = stream_pb2_grpc.StreamInferenceStub(self.channel)
        try:
            wait_until(self._serving, ready_timeout_s, f"lstm-serve on {self.address}", interval_s=0.2)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"server did not become ready; its log:\n{self.log()}") from None

    def _serving(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}; its log:\n{self.log()}")
        try:
            health = health_pb2_grpc.HealthStub(self.channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.channel.close()
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


# --- Redis Cluster and Sentinel topologies (issue 9) ------------------------------------------------

def tls_only(port: int, tls: dict[str, Path]) -> list[str]:
    """redis.conf lines for a node (or sentinel) that speaks TLS only, on `port`, with the PEM files in
    `tls` ("ca", "cert", "key"), to clients and on the links it opens (replication, Sentinel, cluster bus)."""
    return ["port 0", f"tls-port {port}", f"tls-cert-file {tls['cert']}", f"tls-key-file {tls['key']}",
            f"tls-ca-cert-file {tls['ca']}", "tls-auth-clients no", "tls-replication yes", "tls-cluster yes"]


def tls_client_options(tls: dict[str, Path] | None) -> dict[str, object]:
    """redis-py options for a client of such a node."""
    return {"ssl": True, "ssl_ca_certs": str(tls["ca"])} if tls else {}


def stream_keys(node: NodeProcess) -> int:
    """Keys the server wrote (default prefix) on one node."""
    return sum(1 for _ in node.client().scan_iter(match="lstm:*", count=1000))


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, so below 55536."""
    for _ in range(200):
        port = free_port()
        if port < 55536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair (port, port + 10000) below 55536")


class NodeProcess:
    """One redis-server (node or sentinel) from a config file, so a test can SIGKILL it."""

    def __init__(self, port: int, lines: list[str], *, sentinel: bool = False, password: str | None = None,
                 client_options: dict | None = None) -> None:
        self.port = port
        self.password = password
        self.client_options = client_options or {}
        self.dir = tempfile.mkdtemp(prefix="lstm-redis-node-")
        self.config = os.path.join(self.dir, "redis.conf")
        with open(self.config, "w") as file:
            file.write("\n".join([f"port {port}", "bind 127.0.0.1", f"dir {self.dir}", "save \"\"",
                                  f"logfile {os.path.join(self.dir, 'redis.log')}", *lines]) + "\n")
        self.command = [shutil.which("redis-server") or "redis-server", self.config,
                        *(["--sentinel"] if sentinel else [])]
        self.start()

    def start(self) -> None:
        """Start (or, after `stop`, restart) the node from its config file, on the same port."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True,
                           password=self.password, **self.client_options)

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited; see {self.dir}/redis.log")
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def log(self) -> str:
        return Path(self.dir, "redis.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)


class RedisClusterNodes:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback, ready
    (cluster_state:ok, every replica attached). With replicas, a master that stops answering for
    `node_timeout_ms` is replaced by its replica (a cluster failover)."""

    def __init__(self, masters: int = 3, password: str | None = None, *, replicas: int = 0,
                 node_timeout_ms: int = 3000, tls: dict[str, Path] | None = None) -> None:
        """`tls`: PEM files ("ca", "cert", "key"): every node then speaks TLS only, the cluster bus too."""
        auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
        self.masters, self.replicas = masters, replicas
        self.nodes: list[NodeProcess] = []
        try:
            for _ in range(masters * (1 + replicas)):
                port = free_cluster_port()
                self.nodes.append(NodeProcess(
                    port, ["cluster-enabled yes", "cluster-config-file nodes.conf",
                           f"cluster-node-timeout {node_timeout_ms}", "appendonly no",
                           "repl-diskless-sync-delay 0", *auth, *(tls_only(port, tls) if tls else [])],
                    password=password, client_options=tls_client_options(tls)))
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run([shutil.which("redis-cli") or "redis-cli", *(["-a", password] if password else []),
                            *(["--tls", "--cacert", str(tls["ca"])] if tls else []),
                            "--cluster", "create", *addresses, "--cluster-replicas", str(replicas),
                            "--cluster-yes"], check=True, capture_output=True, timeout=60)
            wait_until(self._ready, 30, "cluster_state:ok on every node", interval_s=0.1)
        except BaseException:
            self.stop()  # no fixture will: the caller never gets the object
            raise
        credentials = f":{password}@" if password else ""
        scheme, query = ("rediss", f"?ssl_ca_certs={tls['ca']}") if tls else ("redis", "")
        self.url = f"{scheme}://{credentials}127.0.0.1:{self.nodes[0].port}/0{query}"

    def _ready(self) -> bool:
        attached = 0
        for node in self.nodes:
            client = node.client()
            if client.cluster("info").get("cluster_state") != "ok":
                return False
            if len(client.cluster("slots")) != self.masters:  # every node sees every master
                return False
            replication = client.info("replication")
            attached += replication["role"] == "slave" and replication.get("master_link_status") == "up"
        return attached == self.masters * self.replicas  # every replica synced with its master

    def node_id(self, node: NodeProcess) -> str:
        return node.client().execute_command("CLUSTER", "MYID")

    def owner_of(self, slot: int) -> NodeProcess:
        for start, end, master, *_ in self.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise LookupError(slot)

    def migrate_slot(self, slot: int, source: NodeProcess, target: NodeProcess) -> int:
        """Move one slot and its keys from source to target, the way redis-cli --cluster reshard does:
        IMPORTING/MIGRATING, MIGRATE of the keys in batches, then SETSLOT NODE everywhere. Returns keys moved."""
        src, dst = source.client(), target.client()
        source_id, target_id = self.node_id(source), self.node_id(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        for node in (target, source, *[n for n in self.nodes if n not in (source, target)]):
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, `replicas` replicas and `sentinels` sentinels on loopback; Sentinel fails over in a few seconds."""

    MASTER_NAME = "lstm-master"

    def __init__(self, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                 password: str | None = None, sentinel_password: str | None = None,
                 tls: dict[str, Path] | None = None) -> None:
        """`password`: the master's and replicas'; `sentinel_password`: the sentinels' own (requirepass);
        `tls`: PEM files ("ca", "cert", "key"): every node and sentinel then speaks TLS only, to clients
        and to each other."""
        common = ["appendonly no", "repl-diskless-sync-delay 0", "repl-ping-replica-period 1"]
        if password:
            common += [f"requirepass {password}", f"masterauth {password}"]
        self._started: list[NodeProcess] = []

        def node(lines: list[str], **options) -> NodeProcess:
            port = free_port()
            self._started.append(NodeProcess(port, [*lines, *tls_only(port, tls)] if tls else lines,
                                             client_options=tls_client_options(tls), **options))
            return self._started[-1]

        try:
            self.master = node(common, password=password)
            self.replicas = [node([*common, f"replicaof 127.0.0.1 {self.master.port}"], password=password)
                             for _ in range(replicas)]
            monitor = [
                f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                *([f"sentinel auth-pass {self.MASTER_NAME} {password}"] if password else []),
                f"sentinel down-after-milliseconds {self.MASTER_NAME} {down_after_ms}",
                f"sentinel failover-timeout {self.MASTER_NAME} 4000",
                f"sentinel parallel-syncs {self.MASTER_NAME} 2",
                # Sentinels that require a password use it with each other too.
                *([f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
                  if sentinel_password else []),
            ]
            self.sentinels = [node(monitor, sentinel=True, password=sentinel_password) for _ in range(sentinels)]
            self.addresses = sentinel_addresses(self.sentinels)
            wait_until(self._settled, 30, "sentinels that know every replica and each other", interval_s=0.1)
        except BaseException:
            self.stop()  # no fixture will: the caller never gets the object
            raise

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.client().sentinel_master(self.MASTER_NAME)
            if state["num-slaves"] < len(self.replicas) or state["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
        return all(r.client().info("replication").get("master_link_status") == "up" for r in self.replicas)

    @property
    def server_flags(self) -> tuple[str, ...]:
        """lstm-serve's flags for finding this group's master through its sentinels."""
        return sentinel_flags(self.sentinels)

    def master_port(self) -> int:
        _host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(self.MASTER_NAME)
        return int(port)

    def stop(self) -> None:
        for node in reversed(self._started):  # the sentinels first, the master last
            node.stop()


def sentinel_addresses(sentinels: list[NodeProcess]) -> str:
    """--redis-sentinels for these sentinels, in this order."""
    return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinels)


def sentinel_flags(sentinels: list[NodeProcess]) -> tuple[str, ...]:
    """lstm-serve's flags for finding SentinelGroup.MASTER_NAME through these sentinels, asked in this order."""
    return ("--redis-sentinels", sentinel_addresses(sentinels), "--redis-sentinel-master", SentinelGroup.MASTER_NAME)


def triton_messages() -> tuple[ModuleType, ModuleType]:
    """Triton's generated messages and stubs: tritonclient's copy, or the server's own when this process
    already loaded that one. Both declare the protobuf package `inference` (the same wire format), and
    only one of them fits in protobuf's default descriptor pool."""
    if "lstm_stream.triton.grpc_service_pb2" in sys.modules:
        from lstm_stream.triton import grpc_service_pb2 as messages
        from lstm_stream.triton import grpc_service_pb2_grpc as stubs
    else:
        from tritonclient.grpc import service_pb2 as messages
        from tritonclient.grpc import service_pb2_grpc as stubs
    return messages, stubs


# perf_analyzer (Triton's load generator, a C++ binary) as the Triton peer's setup script builds it under
# /tmp/triton (../shared/peers/triton/setup.sh: the PyPI wheel run through a newer glibc loader).
TRITON_PEER = Path("/tmp/triton")
_PEER_LIBS = TRITON_PEER / "sysroot" / "usr" / "lib" / "x86_64-linux-gnu"
_PEER_PERF_ANALYZER = [
    str(_PEER_LIBS / "ld-linux-x86-64.so.2"), "--library-path", str(_PEER_LIBS),
    str(TRITON_PEER / "pa" / "perf_analyzer" / "bin" / "perf_analyzer"),
]


def perf_analyzer_command() -> list[str] | None:
    """perf_analyzer on this machine: $PERF_ANALYZER (a command), the Triton peer's build, or PATH."""
    if command := os.environ.get("PERF_ANALYZER"):
        return shlex.split(command)
    if all(Path(part).exists() for part in (_PEER_PERF_ANALYZER[0], _PEER_PERF_ANALYZER[-1])):
        return _PEER_PERF_ANALYZER
    if binary := shutil.which("perf_analyzer"):
        return [binary]
    return None


def scrape(server) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of a server's /metrics: {sample name: {sorted labels: value}}."""
    return scrape_port(server.metrics_port)


def scrape_port(metrics_port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)
