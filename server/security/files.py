"""Noticing that a key or certificate file was replaced or rewritten, so it is read again (no restart)."""

from __future__ import annotations

import os


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten: inode, size, modification time."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
