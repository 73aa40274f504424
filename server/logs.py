"""Structured logs: one JSON object a line (or plain text), with a record's `fields` merged in."""

from __future__ import annotations

import json
import logging
import sys
import time
from urllib.parse import parse_qsl, urlencode, urlsplit


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        return f"{text} {json.dumps(fields, default=str)}" if fields else text


def redact_url(url: str) -> str:
    """The URL with its password (in the user part or a `password=` query field) replaced by `***`:
    what logs and messages show of a Redis URL. The user name stays: it helps to debug ACLs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if password is not None:
        user_info, _, host = parts.netloc.rpartition("@")
        url = url.replace(parts.netloc, f"{user_info.partition(':')[0]}:***@{host}", 1)
    if "password" in parts.query.lower():
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        fields = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        url = url[: url.index("?") + 1] + urlencode(fields, safe="*/")
    return url


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
