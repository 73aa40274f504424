"""How the configuration spells a Redis topology: sentinel addresses, and sentinel credentials in the URL.

Plain text parsing, shared by the configuration (which checks the flags at start-up) and the state layer
(which connects): here, so that server/config.py never imports redis (`python -m server.healthcheck`
reads the configuration and must import grpc only).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# Query parameters of --redis-url that carry the sentinels' own credentials, as redis-py's options.
SENTINEL_CREDENTIALS = {"sentinel_username": "username", "sentinel_password": "password"}

HOW_TO_ENCODE = (
    "percent-encode such characters in the user name and password: % as %25, # as %23, / as %2F, ? as %3F, "
    "@ as %40, : as %3A (Python: urllib.parse.quote(password, safe=''))"
)
_NOT_AN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def url_spelling_problem(url: str) -> str | None:
    """Why `url` would not be read as written, or None. The answer quotes nothing of the URL.

    A `#`, `/` or `?` ends a URL's host part, so a password holding one unencoded is cut there: urllib and
    redis-py then read a piece of the password as the host or the port (and say so in their errors), or
    connect without it. An `@` after that point is the sign. A `%` not followed by two hex digits is not
    an escape, and one that is would be decoded: either way the password sent is not the one written.
    """
    _, sep, rest = url.partition("://")
    if not sep:
        return None  # no scheme: redis-py refuses it, naming the schemes it takes
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@")
    if at >= authority_end:
        return ("its user name or password holds a '#', '/' or '?' (or an '@' follows the host): "
                + HOW_TO_ENCODE)
    if at > 0 and _NOT_AN_ESCAPE.search(rest[:at]):
        return "its user name or password holds a '%' that does not start an escape: " + HOW_TO_ENCODE
    return None


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
        if "@" in part:  # never quoted: it may be a password
            raise ValueError("sentinel addresses are host:port only; the sentinels' own password goes in "
                             "--redis-url as ?sentinel_password=...")
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {part!r}")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)
