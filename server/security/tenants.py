"""Tenants: who an API key belongs to, and what each tenant may use (invariant 13, docs/invariants.md).

The key file (`--api-keys`) has one `TENANT KEY` pair a line, `#` comments, and optional per-tenant
limits after the key (`max_streams=N`, `chunks_per_s=R`) that override the server-wide defaults.
A tenant may have several keys (rotation: add the new key, move clients, remove the old one).

Keys are never kept in the clear: each is stored as a keyed digest (BLAKE2b, a MAC) under a random
per-process secret, and a presented key is looked up by its digest. The time a lookup takes depends
only on that digest, which a caller cannot choose without the secret, so it says nothing about any
stored key (what a constant-time comparison against every key would give, at the cost of one hash).
Nothing here puts a key into a message or a log line.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

from server.security.files import file_signature
from server.security.limits import NO_LIMITS, TenantLimits

# Tenant names sit in Redis keys (`<prefix>:<tenant>:{<stream_id>}`) and in metric labels.
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_KEY_LENGTH = 16
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what fits in a Bearer token


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the line, never a key."""


@dataclass(frozen=True, slots=True)
class Directory:
    """One loaded key file: key digest -> tenant, and each tenant's limits."""

    secret: bytes
    tenants_by_digest: dict[bytes, str]
    limits: dict[str, TenantLimits]

    def tenant_of(self, key: str) -> str | None:
        return self.tenants_by_digest.get(_digest(self.secret, key))

    @property
    def tenant_names(self) -> list[str]:
        return sorted(self.limits)


def _digest(secret: bytes, key: str) -> bytes:
    # Keyed BLAKE2b is a MAC by design (RFC 7693), and about 3 times as fast here as HMAC-SHA256.
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=secret, digest_size=32).digest()


def _limit(text: str, line_number: int) -> tuple[str, float]:
    # Messages here never repeat what the line says: a key written in the wrong column would be logged.
    name, _, value = text.partition("=")
    if name not in ("max_streams", "chunks_per_s"):
        raise KeyFileError(f"line {line_number}: after the key only max_streams=N and chunks_per_s=R may follow")
    try:
        number = float(int(value)) if name == "max_streams" else float(value)
    except ValueError:
        raise KeyFileError(f"line {line_number}: {name} must be a number") from None
    if not 0 <= number < math.inf:
        raise KeyFileError(f"line {line_number}: {name} must be 0 (no limit) or a positive number")
    return name, number


def parse_key_file(text: str, defaults: TenantLimits = NO_LIMITS) -> Directory:
    """Parse a key file; a KeyFileError names the line and what is wrong, never a field's content."""
    secret = os.urandom(32)
    tenants_by_digest: dict[bytes, str] = {}
    limits: dict[str, TenantLimits] = {}
    limit_lines: dict[str, int] = {}  # the line that gave a tenant's limits
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise KeyFileError(f"line {line_number}: expected `TENANT KEY [max_streams=N] [chunks_per_s=R]`")
        tenant, key, options = parts[0], parts[1], parts[2:]
        if not TENANT_NAME.fullmatch(tenant):
            raise KeyFileError(
                f"line {line_number}: a tenant name is 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'"
            )
        if len(key) < MIN_KEY_LENGTH or not _KEY_CHARS.fullmatch(key):
            raise KeyFileError(
                f"line {line_number}: a key is at least {MIN_KEY_LENGTH} printable characters without spaces "
                "or '#' (for example `openssl rand -hex 32`)"
            )
        digest = _digest(secret, key)
        if digest in tenants_by_digest:
            raise KeyFileError(f"line {line_number}: this key is listed twice; a key belongs to one tenant")
        tenants_by_digest[digest] = tenant
        values = dict(_limit(option, line_number) for option in options)
        tenant_limits = TenantLimits(
            max_streams=int(values.get("max_streams", defaults.max_streams)),
            chunks_per_s=float(values.get("chunks_per_s", defaults.chunks_per_s)),
        )
        if options:
            if tenant in limit_lines and limits[tenant] != tenant_limits:
                raise KeyFileError(f"line {line_number}: this tenant has other limits on line "
                                   f"{limit_lines[tenant]}; give them once")
            limits[tenant], limit_lines[tenant] = tenant_limits, line_number
        else:
            limits.setdefault(tenant, tenant_limits)
    if not tenants_by_digest:
        raise KeyFileError("no keys in the file: every call would be refused")
    return Directory(secret, tenants_by_digest, limits)


class Tenants:
    """The current key directory, swapped whole on reload; read by the interceptor and the data plane.

    `generation` counts the directories loaded: an open call compares it with the one its key was
    checked under, one integer per message, and looks its key up again only when it changed.
    """

    def __init__(self, path: str, defaults: TenantLimits = NO_LIMITS) -> None:
        self.path = path
        self.defaults = defaults
        self.signature = file_signature(path)
        self.directory = self._read()
        self.generation = 0

    def _read(self) -> Directory:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read {self.path}: {exc.__class__.__name__}: "
                               f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
        try:
            return parse_key_file(text, self.defaults)
        except KeyFileError as exc:
            raise KeyFileError(f"{self.path}: {exc}") from None

    def reload(self) -> Directory:
        """Read the file again; on any error the old keys stay in force (and the error is raised)."""
        self.signature = file_signature(self.path)
        directory = self._read()
        self.directory = directory
        self.generation += 1
        return directory

    def changed(self) -> bool:
        return file_signature(self.path) != self.signature

    def tenant_of(self, key: str) -> str | None:
        return self.directory.tenant_of(key)

    def limits(self, tenant: str) -> TenantLimits:
        return self.directory.limits.get(tenant, self.defaults)
