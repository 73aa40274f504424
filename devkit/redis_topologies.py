"""Redis Cluster and Sentinel groups on loopback, each node a redis-server a test can SIGKILL (issue 9)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import redis

from devkit.processes import free_port, no_retry, wait_until


def tls_only(port: int, tls: dict[str, Path]) -> list[str]:
    """redis.conf lines for a node (or sentinel) that speaks TLS only, on `port`, with the PEM files in
    `tls` ("ca", "cert", "key"), to clients and on the links it opens (replication, Sentinel, cluster bus)."""
    return ["port 0", f"tls-port {port}", f"tls-cert-file {tls['cert']}", f"tls-key-file {tls['key']}",
            f"tls-ca-cert-file {tls['ca']}", "tls-auth-clients no", "tls-replication yes", "tls-cluster yes"]


def tls_client_options(tls: dict[str, Path] | None) -> dict[str, object]:
    """redis-py options for a client of such a node."""
    return {"ssl": True, "ssl_ca_certs": str(tls["ca"])} if tls else {}


def stream_keys(node: NodeProcess) -> int:
    """Streams' slot keys the server wrote (default prefix) on one node (not its record-format key)."""
    return sum(1 for _ in node.client().scan_iter(match="lstm:{*", count=1000))


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

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True,
                           password=self.password, **{**self.client_options, **options})

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited; see {self.dir}/redis.log")
        try:
            return bool(self.client(retry=no_retry()).ping())
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
