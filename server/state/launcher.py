"""Finding Redis at start-up, or starting a private one for a user who has none running.

A new user should be able to run `lstm-serve` and stream. So when nothing answers at a loopback
redis_url and `redis-server` is installed, this starts one on that port with its data in a local
folder and the append-only file on (state survives restarts), and says so in the log.

The private Redis is started with the URL's credentials or not at all: a password becomes `requirepass`;
a user name with a password becomes that ACL user (all commands and keys) with the `default` user turned
off, so the one identity the URL names is the only way in (a second name for the same secret would add
nothing, and a `default` user left open would answer anyone on the machine). Its configuration goes to
redis-server on stdin: no password in `ps` or on disk. It binds only the loopback address the URL names.

A private Redis belongs to every lstm-serve that uses it, not to the one that started it (docs/operations.md,
"A private Redis"). Its data folder holds a marker (`lstm-serve-private-redis.json`: port, pid, no
secrets); a server that finds Redis answering at its URL reads the folder from `CONFIG GET dir` and, when
the marker is there, depends on it as the one that started it does. Each such server keeps one named
connection open to it (`lstm-serve-user:<pid>`), and:
- restarts it from the same folder (append-only file: the data comes back) when it finds it gone,
  under a lock in that folder, so two servers never start two;
- at exit, stops it (SHUTDOWN: the append-only file is flushed) only when no other lstm-serve's
  connection is open to it; otherwise leaves it running for them.
It runs in its own session, so a Ctrl-C in the terminal of the server that started it reaches only that
server, which drains and saves its last chunks before deciding whether Redis should stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry

from server.errors import StartupError
from server.security.redact import redact_url, scrub
from server.state.connection import RedisTopology, RedisUrlError, check_topology, check_url, refused_credentials

log = logging.getLogger(__name__)

HOW_TO_GET_REDIS = (
    "install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`) and run "
    "lstm-serve again, or point --redis-url / LSTM_SERVE_REDIS_URL at a running Redis"
)
MARKER = "lstm-serve-private-redis.json"
LOCK = "lstm-serve-private-redis.lock"
# The name of each server's watching connection: how a server stopping sees that others still use Redis.
USER_PREFIX = "lstm-serve-user:"
WATCH_INTERVAL_S = 1.0


class RedisUnavailable(StartupError):
    """No Redis can be had; the message says what to do."""

    headline = "no Redis"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: the only hosts a private Redis is started for."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client(url: str, **options: Any) -> redis.Redis:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, **options)
    except ValueError as exc:  # redis-py's own parser: wrong scheme, bad port
        raise RedisUrlError.unreadable(url, exc) from None


def _answers(url: str) -> bool:
    """True when Redis answers PING at url, False when nothing does; a StartupError (start-up exits 2) for a
    URL that is not a Redis URL, or when what answers there is not Redis or refuses us."""
    client = _client(url)
    try:
        return bool(client.ping())
    except redis.exceptions.AuthenticationError as exc:
        raise RedisUnavailable(refused_credentials(url, exc)) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return False
    except redis.exceptions.RedisError as exc:  # a reply that is not RESP, or an error reply to PING
        raise RedisUnavailable(
            f"something answers at {redact_url(url)} but it is not a Redis server we can use "
            f"({scrub(str(exc), url)}); check the host and port of --redis-url"
        ) from None
    finally:
        client.close()


def _quote(value: str) -> str:
    """A redis.conf argument, double-quoted (redis-server splits its configuration like a shell)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


class PrivateRedis:
    """The private redis-server this server depends on: started here, or found by its marker.

    `watch()` keeps a named connection open and restarts the Redis when it is gone (autostart on);
    `release()`, at exit, stops it unless another lstm-serve still uses it."""

    def __init__(self, url: str, folder: Path, process: subprocess.Popen | None, autostart: bool) -> None:
        options = parse_url(url)
        self.url = url
        self.folder = folder
        self.process = process  # the redis-server this process started last, if any
        self.autostart = autostart
        self.host: str = options.get("host", "localhost")
        self.port: int = options.get("port", 6379)
        self._username: str | None = options.get("username")
        self._password: str | None = options.get("password")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # No resends: an outage is seen at the next ping, not after redis-py's backoff.
        self._client = _client(url, client_name=f"{USER_PREFIX}{os.getpid()}", retry=Retry(NoBackoff(), 0))

    @property
    def credentials(self) -> str:
        """What the log says about credentials: never the password."""
        if not self._password:
            return "none (any local user can connect)"
        if self._username and self._username != "default":
            return f"ACL user {self._username!r} with the URL's password; the default user off"
        return "requirepass (the URL's password)"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One server at a time starts, restarts or stops the private Redis of this folder."""
        with open(self.folder / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _configuration(self) -> str:
        bind = "127.0.0.1" if self.host == "localhost" else self.host
        lines = [
            f"bind {bind}", f"port {self.port}", f"dir {_quote(str(self.folder))}",
            "appendonly yes", "appendfsync everysec", 'save ""',
            f"logfile {_quote(str(self.folder / 'redis.log'))}", "daemonize no",
        ]
        if self._password and self._username and self._username != "default":
            user = f"user {_quote(self._username)} on {_quote('>' + self._password)} ~* &* +@all"
            lines += ["user default off", user]
        elif self._password:
            lines.append(f"requirepass {_quote(self._password)}")
        return "\n".join(lines) + "\n"

    def start(self, wait_s: float) -> None:
        """Start redis-server for this URL in this folder; RedisUnavailable when it does not come up."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailable(
                f"nothing answers at {redact_url(self.url)} and redis-server is not installed; {HOW_TO_GET_REDIS}")
        # Its own session: a Ctrl-C for the server that started it is not one for Redis (see the docstring).
        process = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True, text=True)
        assert process.stdin is not None
        process.stdin.write(self._configuration())
        process.stdin.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RedisUnavailable(f"the private redis-server exited with code {process.returncode}; "
                                       f"see {self.folder / 'redis.log'}")
            if _answers(self.url):
                if self.process is not None:
                    self.process.poll()  # reap the one that stopped
                self.process = process
                marker = {"host": self.host, "port": self.port, "pid": process.pid, "started_by": os.getpid(),
                          "credentials": self.credentials}
                (self.folder / MARKER).write_text(json.dumps(marker) + "\n")
                return
            time.sleep(0.1)
        process.terminate()
        raise RedisUnavailable(f"the private redis-server did not answer within {wait_s:.0f} s; "
                               f"see {self.folder / 'redis.log'}")

    def watch(self) -> None:
        """Keep this server's named connection open, and the private Redis up, until release()."""
        try:
            self._client.ping()  # opens the named connection now: a neighbour stopping sees this server
        except redis.exceptions.RedisError as exc:
            raise RedisUnavailable(f"the private Redis at {redact_url(self.url)} stopped answering during "
                                   f"start-up ({scrub(str(exc), self.url)}); start lstm-serve again") from None
        self._thread = threading.Thread(target=self._watch, name="private-redis-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self._client.ping()
                reported = False
                continue
            except redis.exceptions.BusyLoadingError:  # up, reading its append-only file
                continue
            except redis.exceptions.ConnectionError:
                pass
            except redis.exceptions.RedisError:  # busy loading its append-only file, or a timeout: wait
                continue
            if not self.autostart:
                if not reported:
                    log.warning("the private Redis has stopped; not restarting it (autostart is off)",
                                extra={"fields": {"redis_url": redact_url(self.url)}})
                    reported = True
                continue
            try:
                with self._locked():
                    if self._stop.is_set() or _answers(self.url):
                        continue  # another server restarted it first
                    self.start(wait_s=15.0)
                log.warning("the private Redis had stopped; restarted it from its data folder",
                            extra={"fields": {"redis_url": redact_url(self.url), "data_dir": str(self.folder),
                                              "pid": self.process.pid if self.process else None,
                                              "credentials": self.credentials}})
            except (StartupError, OSError) as exc:
                log.warning("the private Redis has stopped and could not be restarted: %s", exc)

    def _other_users(self) -> int:
        me = self._client.client_id()
        return sum(1 for c in self._client.client_list()
                   if str(c.get("name", "")).startswith(USER_PREFIX) and int(c["id"]) != me)

    def release(self) -> None:
        """At exit: stop the private Redis (its append-only file flushed) unless another lstm-serve uses it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=20)
        try:
            with self._locked():
                try:
                    others = self._other_users()
                except redis.exceptions.RedisError:
                    others = 0  # gone already, or not answering: stop what this process started
                if others:
                    log.info("left the private Redis running: other lstm-serve servers use it",
                             extra={"fields": {"redis_url": redact_url(self.url), "servers": others}})
                    return
                with contextlib.suppress(redis.exceptions.RedisError):
                    self._client.shutdown()
                self._wait_gone()
        finally:
            self._client.close()

    def _wait_gone(self) -> None:
        if self.process is not None:
            for stop in (self.process.terminate, self.process.kill):  # when SHUTDOWN did not do it
                try:
                    self.process.wait(timeout=10)
                    return
                except subprocess.TimeoutExpired:
                    stop()
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _answers(self.url):
            time.sleep(0.1)


def _found_private(url: str, autostart: bool) -> PrivateRedis | None:
    """The private Redis another lstm-serve started at this URL (its marker in its data folder), or None."""
    options = parse_url(url)
    if not is_loopback(options.get("host", "localhost")):
        return None
    client = _client(url)
    try:  # a private Redis lets the URL's user do anything; a Redis that does not is not one
        folder = Path(client.config_get("dir")["dir"])
        pid = client.info("server")["process_id"]
        marker = json.loads((folder / MARKER).read_text())
    except (redis.exceptions.RedisError, KeyError, OSError, ValueError):
        return None
    finally:
        client.close()
    # The marker is this very process's: a stale one (a folder reused by a Redis started otherwise) is not.
    if marker.get("pid") != pid or marker.get("port") != options.get("port", 6379):
        return None
    found = PrivateRedis(url, folder, None, autostart)
    log.info("using the private redis-server another lstm-serve started; this server keeps it running while it "
             "uses it, and restarts it from its data folder if it stops",
             extra={"fields": {"redis_url": redact_url(url), "data_dir": str(folder), "pid": marker.get("pid"),
                               "started_by": marker.get("started_by")}})
    return found


def ensure_redis(url: str, data_dir: str, autostart: bool, wait_s: float = 15.0) -> PrivateRedis | None:
    """None when a Redis that is not private answers at url; else the private Redis this server depends on
    (started here, or found), watched until `release()`."""
    check_url(url)
    private = _found_private(url, autostart) if _answers(url) else _start_private(url, data_dir, autostart, wait_s)
    if private is not None:
        try:
            private.watch()
        except StartupError:
            private.release()
            raise
    return private


def _start_private(url: str, data_dir: str, autostart: bool, wait_s: float) -> PrivateRedis | None:
    shown = redact_url(url)
    if not autostart:
        raise RedisUnavailable(f"nothing answers at {shown} (autostart is off); {HOW_TO_GET_REDIS}")
    options = parse_url(url)
    if not url.startswith("redis://") or not is_loopback(options.get("host", "localhost")):
        raise RedisUnavailable(
            f"nothing answers at {shown}; a private Redis is only started for a redis:// URL on a loopback address "
            "(127.0.0.0/8, ::1, localhost), never for another host. " + HOW_TO_GET_REDIS
        )
    if options.get("username") and not options.get("password"):
        raise RedisUnavailable(
            f"nothing answers at {shown}, and a private Redis is not started for a URL with a user name but no "
            "password: write redis://:PASSWORD@host:port/db (or USER:PASSWORD@), or no credentials at all"
        )
    folder = Path(data_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    private = PrivateRedis(url, folder, None, autostart)
    with private._locked():
        if _answers(url):  # another server started it meanwhile
            return _found_private(url, autostart)
        private.start(wait_s)
    log.warning(
        "no Redis answered, so a private redis-server was started for this server",
        extra={"fields": {"redis_url": shown, "data_dir": str(folder), "pid": private.process.pid if private.process
                          else None, "appendonly": True, "credentials": private.credentials}},
    )
    return private


def check_redis(config: Any) -> PrivateRedis | None:
    """Start-up: Redis is reachable and is what the configuration says (one node, Sentinel or Cluster).

    Returns the private Redis this server depends on (one-node mode only), to `release_private_redis` at
    exit; raises RedisUrlError, RedisUnavailable or TopologyError (connection.py) with one line saying
    what to change."""
    check_url(config.redis_url)
    topology = RedisTopology.from_config(config)
    private = None
    if topology.mode == "single":
        private = ensure_redis(config.redis_url, config.redis_data_dir, config.redis_autostart)
    try:
        check_topology(topology)
    except Exception:
        release_private_redis(private)
        raise
    return private


def release_private_redis(private: PrivateRedis | None) -> None:
    """At exit: the private Redis stops with the last lstm-serve that uses it (SIGTERM-like: AOF flushed)."""
    if private is not None:
        private.release()
