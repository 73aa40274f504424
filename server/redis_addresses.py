"""How the configuration spells a Redis topology: sentinel addresses, and sentinel credentials in the URL.

Plain text parsing, shared by the configuration (which checks the flags at start-up) and the state layer
(which connects): here, so that server/config.py never imports redis (`python -m server.healthcheck`
reads the configuration and must import grpc only).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

# Query parameters of --redis-url that carry the sentinels' own credentials, as redis-py's options.
SENTINEL_CREDENTIALS = {"sentinel_username": "username", "sentinel_password": "password"}


def sentinel_credentials_in(url: str) -> list[str]:
    """The names of the sentinel credential parameters `url` carries (its values are never returned)."""
    try:
        return [name for name, _ in parse_qsl(urlsplit(url).query) if name in SENTINEL_CREDENTIALS]
    except ValueError:  # not a URL urllib can split: redis-py refuses it at start-up anyway
        return []


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """'host:port,host:port' -> ((host, port), ...); ValueError naming the bad entry."""
    addresses = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {part!r}")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)
