"""Secrets out of logs and error messages: a Redis URL is shown only with its password masked.

Every log line and error message that names a Redis URL passes it through `redact_url` first, so a
password given in `--redis-url` (or its environment variable) never reaches a log or a client.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters redis-py reads credentials from, besides the URL's user-info part.
_SECRET_PARAMETERS = frozenset({"password", "sentinel_password", "pass", "auth", "token"})
# Fallback for text urlsplit cannot parse: anything between "//user:" and "@" is a password.
_USERINFO = re.compile(r"(//[^/@:]*:)[^/@]*@")


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***; everything else (host, port, db, user) kept for debugging."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{hostinfo}" if has_password else f"{user}@{hostinfo}"
            # A bare "redis://secret@host" is a password too in redis-py (no user name given).
            if not has_password and user:
                netloc = f"{MASK}@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs], safe="*")
        text = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        if not netloc and url.startswith(f"{parts.scheme}://"):  # unix:///path keeps its empty host
            text = f"{parts.scheme}://" + text[len(parts.scheme) + 1:]
        return text
    except ValueError:
        return _USERINFO.sub(rf"\g<1>{MASK}@", url)
