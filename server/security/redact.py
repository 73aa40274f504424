"""Secrets out of logs and error messages: a Redis URL is shown only with its password masked.

Every log line and error message that names a Redis URL passes it through `redact_url` first, so a
password given in `--redis-url` (or its environment variable) never reaches a log or a client. Text
that may quote a URL's pieces (a parser's exception, a connection error) passes through `scrub`.

Neither trusts the URL to be well formed: a password with an unencoded `#`, `/` or `?` ends the URL's
authority early for urllib (`redis://:pw#tail@host` has no host and "pw" as its port for urllib and
redis-py), so the user-info part is taken as everything between `scheme://` and the last `@`. When
that over-reaches (an `@` in a query value), more is masked than needed, never less.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

MASK = "***"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?(.*)$", re.DOTALL)
# A query parameter: name=value after ?, & or ;. The value runs to the next "&name=" (or ";name="), not to
# the next & or #: an unencoded one may be part of a password.
_PARAMETER = re.compile(r"(?<=[?&;])([^=&;#]*)=((?:(?![&;][A-Za-z_][A-Za-z0-9_]*=).)*)", re.DOTALL)
# Pieces of a password that are distinctive enough to look for in a message: split where URL parsers split.
_SEPARATORS = re.compile(r"[#/?@:%&=;\s\[\]]+")
_MIN_PIECE = 3


def _secret_parameter(name: str) -> bool:
    """Query parameters redis-py passes on as options that carry credentials (password, sentinel_password,
    ssl_password, ...)."""
    name = unquote_plus(name).lower()
    return name == "auth" or any(word in name for word in ("pass", "secret", "token"))


def _split(url: str) -> tuple[str, str | None, str]:
    """(scheme:// or "", the user-info part or None, what follows its @)."""
    match = _SCHEME.match(url)
    assert match is not None  # the pattern matches every string
    prefix, rest = match.group(1) or "", match.group(2)
    at = rest.rfind("@")
    if at < 0:
        return prefix, None, rest
    return prefix, rest[:at], rest[at + 1:]


def _mask_parameters(text: str) -> str:
    return _PARAMETER.sub(lambda m: f"{m.group(1)}={MASK}" if _secret_parameter(m.group(1)) else m.group(0), text)


def redact_url(url: str) -> str:
    """`url` with any password replaced by ***; host, port, db and user name kept for debugging."""
    prefix, userinfo, rest = _split(url)
    if userinfo is None:
        return prefix + _mask_parameters(rest)
    user, has_password, _ = userinfo.partition(":")
    if not has_password:
        # A bare "redis://secret@host" is a password in many clients: masked whole.
        shown = MASK if userinfo else ""
    elif any(c in user for c in "/?#"):
        shown = MASK  # not a user name: the URL is malformed before its first ':'
    else:
        shown = f"{user}:{MASK}"
    # What follows the @ may still hold a piece of a password, when an unencoded @ sat in a query value.
    return f"{prefix}{shown}@{_scrub(_mask_parameters(rest), secrets_in(url))}"


def secrets_in(url: str) -> list[str]:
    """Every credential `url` carries, raw and percent-decoded, with its distinctive pieces, longest first."""
    prefix, userinfo, _ = _split(url)
    found: set[str] = set()
    whole = url[len(prefix):]
    values = [m.group(2) for m in _PARAMETER.finditer(whole) if _secret_parameter(m.group(1))]
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        values.append(password if has_password else user)
    for value in values:
        for form in (value, unquote(value), unquote_plus(value)):
            if len(form) >= 2:
                found.add(form)
            found.update(piece for piece in _SEPARATORS.split(form) if len(piece) >= _MIN_PIECE)
    return sorted(found, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (an exception's message, say) with every credential of `url`, and any piece of one, masked."""
    return _scrub(text, secrets_in(url))


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
