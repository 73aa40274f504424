"""Finding Redis at start-up, or starting a private one for a user who has none running.

A new user should be able to run `lstm-serve` and stream. So when nothing answers at a loopback
redis_url and `redis-server` is installed, this starts one on that port with its data in a local
folder and the append-only file on (state survives restarts), and says so in the log.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from server.errors import StartupError
from server.security.redact import redact_url
from server.state.connection import RedisTopology, check_topology

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
HOW_TO_GET_REDIS = (
    "install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`) and run "
    "lstm-serve again, or point --redis-url / LSTM_SERVE_REDIS_URL at a running Redis"
)


class RedisUnavailable(StartupError):
    """No Redis can be had; the message says what to do."""

    headline = "no Redis"


def _where(url: str) -> str:
    """host:port of a URL, for messages: never the password a URL may carry."""
    parsed = urlparse(url)
    try:
        return f"{parsed.hostname or 'localhost'}:{parsed.port or 6379}" if parsed.scheme != "unix" else parsed.path
    except ValueError:
        return parsed.hostname or "?"


def _answers(url: str) -> bool:
    """True when Redis answers PING at url, False when nothing does; RedisUnavailable (start-up exits 2) for a
    URL that is not a Redis URL, or when what answers there is not Redis or refuses us."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    except ValueError as exc:  # redis-py's own parser: wrong scheme, bad port
        raise RedisUnavailable(
            f"--redis-url is not a Redis URL ({exc}); expected redis://[:password@]host[:port][/db], "
            "rediss://... (TLS) or unix:///path/to/redis.sock"
        ) from None
    try:
        return bool(client.ping())
    except redis.exceptions.AuthenticationError as exc:
        raise RedisUnavailable(f"Redis at {_where(url)} refused the credentials in --redis-url: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return False
    except redis.exceptions.RedisError as exc:  # a reply that is not RESP, or an error reply to PING
        raise RedisUnavailable(
            f"something answers at {_where(url)} but it is not a Redis server we can use ({exc}); "
            "check the host and port of --redis-url"
        ) from None
    finally:
        client.close()


def ensure_redis(url: str, data_dir: str, autostart: bool, wait_s: float = 15.0) -> subprocess.Popen | None:
    """Return None when Redis answers at url, or the private redis-server process started for it."""
    if _answers(url):
        return None
    where = urlparse(url)
    if not autostart:
        raise RedisUnavailable(f"nothing answers at {redact_url(url)} (autostart is off); {HOW_TO_GET_REDIS}")
    if where.scheme != "redis" or (where.hostname or "") not in LOOPBACK_HOSTS:
        raise RedisUnavailable(
            f"nothing answers at {redact_url(url)}; a private Redis is only started for a redis:// URL on this "
            "machine. "
            + HOW_TO_GET_REDIS
        )
    binary = shutil.which("redis-server")
    shown = redact_url(url)
    if binary is None:
        raise RedisUnavailable(f"nothing answers at {shown} and redis-server is not installed; {HOW_TO_GET_REDIS}")
    folder = Path(data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    port = where.port or 6379
    host = where.hostname if where.hostname not in (None, "localhost") else "127.0.0.1"
    command = [
        binary, "--bind", host, "--port", str(port), "--dir", str(folder),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--logfile", str(folder / "redis.log"), "--daemonize", "no",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RedisUnavailable(
                f"the private redis-server exited with code {process.returncode}; see {folder / 'redis.log'}"
            )
        if _answers(url):
            log.warning(
                "no Redis answered, so a private redis-server was started for this server",
                extra={"fields": {"redis_url": redact_url(url), "data_dir": str(folder), "pid": process.pid,
                                  "appendonly": True}},
            )
            return process
        time.sleep(0.1)
    process.terminate()
    raise RedisUnavailable(f"the private redis-server did not answer within {wait_s:.0f} s; see {folder / 'redis.log'}")


def check_redis(config: Any) -> subprocess.Popen | None:
    """Start-up: Redis is reachable and is what the configuration says (one node, Sentinel or Cluster).

    Returns the private redis-server process when one was started (one-node mode only); raises
    RedisUnavailable or TopologyError (connection.py) with one line saying what to change.
    """
    topology = RedisTopology.from_config(config)
    process = None
    if topology.mode == "single":
        process = ensure_redis(config.redis_url, config.redis_data_dir, config.redis_autostart)
    try:
        check_topology(topology)
    except Exception:
        stop_private_redis(process)
        raise
    return process


def stop_private_redis(process: subprocess.Popen | None) -> None:
    """SIGTERM lets redis-server flush its append-only file before it exits."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
