"""Building the Redis client the configuration asks for: one node, a Sentinel-managed master, or a Cluster.

Every mode is redis-py's own client, so MOVED/ASK redirects, cluster node discovery and Sentinel's
master lookup after a failover are redis-py's work, not ours:

- one node: `redis.asyncio.Redis` from `--redis-url`;
- Sentinel: `redis.asyncio.sentinel.Sentinel(...).master_for(NAME)`; each new connection asks the
  sentinels where the master is, so after a failover the server finds the promoted replica by itself
  (every sentinel is asked, the newest configuration believed: sentinel.py);
- Cluster: `redis.asyncio.cluster.RedisCluster` seeded with `--redis-url` (any node).

The URL carries the credentials (`redis://user:password@host:port/db`) and TLS (`rediss://`) in every
mode; in Sentinel mode its host and port are not used (the sentinels name the master) and the
sentinels themselves are reached with the same TLS setting but without the master's password. Sentinels
that require one of their own (`requirepass` on the sentinels) find it in the URL's query parameters
`sentinel_password` (and `sentinel_username` for an ACL user), which are theirs alone.
The start-up check (`check_topology`) is synchronous: it runs before the event loop, and a wrong
topology is a configuration error (exit code 2), not a runtime fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry

from server.errors import StartupError
from server.redis_addresses import SENTINEL_CREDENTIALS, parse_sentinels, url_spelling_problem
from server.security.redact import redact_url, scrub
from server.state.sentinel import NewestConfigSentinel

AsyncClient = aioredis.Redis | RedisCluster
Mode = Literal["single", "sentinel", "cluster"]


class TopologyError(StartupError):
    """Redis is not what the configuration says it is; the message says what to change."""

    headline = "Redis is not as configured"


class RedisUrlError(StartupError):
    """--redis-url cannot be read as written; the message shows it with its credentials masked, and says
    how to spell them. No message quotes a parser's view of a malformed URL unscrubbed: for urllib a
    password holding '#' is a host or a port, and would be printed as one."""

    headline = "bad --redis-url"

    @classmethod
    def misspelled(cls, url: str, problem: str) -> RedisUrlError:
        return cls(f"{redact_url(url)}: {problem}")

    @classmethod
    def unreadable(cls, url: str, exc: Exception) -> RedisUrlError:
        return cls(f"{redact_url(url)} is not a Redis URL ({scrub(str(exc), url)}); expected "
                   "redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path/to/redis.sock")


def check_url(url: str) -> None:
    """RedisUrlError when --redis-url would not be read as written (a password with an unencoded '#')."""
    if (problem := url_spelling_problem(url)) is not None:
        raise RedisUrlError.misspelled(url, problem)


@dataclass(frozen=True, slots=True)
class RedisTopology:
    url: str
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    timeout_s: float = 2.0

    @classmethod
    def from_config(cls, config: Any) -> RedisTopology:
        return cls(
            url=config.redis_url,
            cluster=config.redis_cluster,
            sentinels=parse_sentinels(config.redis_sentinels),
            sentinel_master=config.redis_sentinel_master,
        )

    @property
    def mode(self) -> Mode:
        if self.cluster:
            return "cluster"
        return "sentinel" if self.sentinels else "single"

    def describe(self) -> str:
        if self.mode == "sentinel":
            where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"master {self.sentinel_master!r} of sentinels {where}"
        return redact_url(self.url)

    def _timeouts(self) -> dict[str, Any]:
        return {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s}

    def _sentinel_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(options for master connections, options for sentinel connections) from the URL."""
        try:
            options = parse_url(self.url)
        except ValueError as exc:
            raise RedisUrlError.unreadable(self.url, exc) from None
        options.pop("host", None)
        options.pop("port", None)
        tls = options.pop("connection_class", None) is SSLConnection
        tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
        credentials = {option: options.pop(name) for name, option in SENTINEL_CREDENTIALS.items() if name in options}
        master = {**options, **self._timeouts(), "ssl": tls}
        sentinel = {**tls_options, **credentials, **self._timeouts(), "ssl": tls}
        return master, sentinel


def connect(topology: RedisTopology) -> AsyncClient:
    """The asyncio client for this topology. It connects lazily: nothing is sent until the first command.

    No socket timeout and, on one node and with Sentinel, no automatic resends: the store bounds every
    call by its caller's deadline and decides itself what may be resent (store.py, attempts.py). The cluster client
    keeps its own retries: they refresh the slot map after a node fails, and a resent save is harmless
    (saves are idempotent)."""
    check_url(topology.url)  # RedisUrlError: a parser's error would quote pieces of a misspelt password
    async_options: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": topology.timeout_s}
    no_resend = {**async_options, "retry": Retry(NoBackoff(), 0), "health_check_interval": 30}
    try:
        if topology.mode == "cluster":
            return RedisCluster.from_url(topology.url, **async_options)
        if topology.mode == "sentinel":
            master, sentinel = topology._sentinel_options()
            return NewestConfigSentinel(topology.sentinels, sentinel_kwargs=sentinel).master_for(
                topology.sentinel_master, **{**master, **no_resend}
            )
        return aioredis.Redis.from_url(topology.url, **no_resend)
    except ValueError as exc:
        raise RedisUrlError.unreadable(topology.url, exc) from None


def check_topology(topology: RedisTopology) -> None:
    """Refuse, with one line saying what to change, a topology that cannot work (TopologyError)."""
    check_url(topology.url)
    if topology.mode == "sentinel":
        _check_sentinels(topology)
        return
    try:
        client = redis.Redis.from_url(topology.url, **topology._timeouts())
    except ValueError as exc:  # redis-py's parser: its message may quote what it took for the host or port
        raise RedisUrlError.unreadable(topology.url, exc) from None
    shown = redact_url(topology.url)
    try:
        info = client.info("cluster")
    except redis.exceptions.AuthenticationError as exc:
        raise TopologyError(refused_credentials(topology.url, exc)) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise TopologyError(f"nothing answers at {shown}: {scrub(str(exc), topology.url)}") from None
    finally:
        client.close()
    enabled = bool(info.get("cluster_enabled"))
    if topology.cluster and not enabled:
        raise TopologyError(
            f"--redis-cluster is set but the Redis at {shown} is not a cluster node (cluster_enabled:0); "
            "drop --redis-cluster, or point --redis-url at a node of a Redis Cluster"
        )
    if not topology.cluster and enabled:
        raise TopologyError(
            f"the Redis at {shown} is a Redis Cluster node; add --redis-cluster "
            "(LSTM_SERVE_REDIS_CLUSTER=true) so that keys are routed to the node that owns them"
        )


def refused_credentials(url: str, exc: Exception, refused_by: str = "") -> str:
    """The message for an AuthenticationError: who refused (the URL masked), and the one spelling mistake that
    causes it."""
    return (f"{refused_by or f'Redis at {redact_url(url)}'} refused the credentials in --redis-url "
            f"({scrub(str(exc), url)}); "
            "if the password holds one of % # / ? @ : it must be percent-encoded (% as %25, # as %23, / as %2F, "
            "? as %3F, @ as %40, : as %3A)")


def _check_master_credentials(topology: RedisTopology, address: tuple[str | bytes, int | bytes]) -> None:
    """The master the sentinels name takes the credentials in --redis-url (TopologyError if it refuses them, as
    on one node). Unreachable is no refusal: a failover may be under way, and the server waits for it."""
    master, _ = topology._sentinel_options()
    host = address[0].decode() if isinstance(address[0], bytes) else address[0]
    port = int(address[1])
    client = redis.Redis(host=host, port=port, **master, retry=SyncRetry(NoBackoff(), 0))
    try:
        client.ping()
    except redis.exceptions.AuthenticationError as exc:
        raise TopologyError(refused_credentials(topology.url, exc, f"the master the sentinels name ({host}:{port})")
                            ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        pass
    finally:
        client.close()


def _check_sentinels(topology: RedisTopology) -> None:
    _, options = topology._sentinel_options()
    failures, known_masters = [], set()
    for host, port in topology.sentinels:
        client = redis.Redis(host=host, port=port, **options)
        try:
            if address := client.sentinel_get_master_addr_by_name(topology.sentinel_master):
                _check_master_credentials(topology, address)
                return
            known_masters.update(client.sentinel_masters())
        except redis.exceptions.AuthenticationError as exc:
            if "password" in options:
                failures.append(f"{host}:{port} (refused the sentinel credentials in --redis-url: "
                                f"{scrub(str(exc), topology.url)})")
            else:
                failures.append(f"{host}:{port} (requires a password: give the sentinels' own in --redis-url "
                                "as ?sentinel_password=...)")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            failures.append(f"{host}:{port} ({scrub(str(exc), topology.url)})")
        except redis.exceptions.ResponseError as exc:  # a plain Redis, not a sentinel
            failures.append(f"{host}:{port} (not a sentinel: {scrub(str(exc), topology.url)})")
        finally:
            client.close()
    if len(failures) == len(topology.sentinels):
        raise TopologyError("no sentinel answered: " + "; ".join(failures))
    raise TopologyError(
        f"the sentinels do not monitor a master named {topology.sentinel_master!r} "
        f"(they monitor: {', '.join(sorted(known_masters)) or 'none'}); fix --redis-sentinel-master"
    )
