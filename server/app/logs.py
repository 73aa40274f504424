"""Structured logs: one JSON object a line (or plain text), with a record's `fields` merged in.

Everything the process writes to stderr should be such a line, including what the native libraries
print there themselves: TensorFlow, XLA and gRPC core log through absl straight to file descriptor 2
(`I0000 ... port.cc:153] oneDNN custom operations are on`), before and regardless of
TF_CPP_MIN_LOG_LEVEL. So, in JSON mode, `carry_native_stderr()` points descriptor 2 at a pipe and
re-logs each of its lines as a JSON record (logger "native"); Python's own stderr keeps the real
descriptor, so a Python traceback is never delayed or lost behind the pipe.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

# Native (absl-format) lines start with their severity letter: I0000 00:00:... file.cc:12] text.
# Carried one level lower than their own: TensorFlow prints harmless notices at E (for example
# "oneDNN supports DT_BOOL only on platforms with AVX-512"), and a normal start must not log errors.
_NATIVE_LEVELS = {"I": logging.DEBUG, "W": logging.DEBUG, "E": logging.WARNING, "F": logging.CRITICAL}
# Python loggers of the libraries the server imports: their records go to the root handler, as JSON.
_LIBRARY_LOGGERS = ("tensorflow", "absl", "keras", "h5py", "grpc", "py.warnings")


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


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library loggers and Python warnings (Keras' UserWarnings) go through the same handler.
    logging.captureWarnings(True)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True


def carry_native_stderr() -> None:
    """Re-log what native code writes to file descriptor 2 as JSON lines (call before importing TensorFlow).

    Children started later (a private redis-server) inherit the pipe too; lines that are already
    JSON objects pass through unchanged.
    """
    real = os.dup(2)
    sys.stderr.flush()
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    threading.Thread(target=_relay, args=(read_end,), name="native-stderr", daemon=True).start()


def _relay(read_end: int) -> None:
    log = logging.getLogger("native")
    with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as pipe:
        for raw in pipe:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("{"):
                sys.stderr.write(line + "\n")
                continue
            if line[1:5].isdigit():
                level = _NATIVE_LEVELS.get(line[0], logging.WARNING)
            elif line.startswith("WARNING: All log messages before absl::InitializeLog()"):
                level = logging.DEBUG  # absl's notice that it has not been configured: always printed
            else:
                level = logging.WARNING  # something unexpected: keep it visible
            log.log(level, "%s", line)
