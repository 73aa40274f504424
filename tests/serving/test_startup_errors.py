"""Start-up errors: a model that cannot be streamed names the layer and the reason; every bad
--redis-url form exits 2 with one clear JSON line; stderr holds only JSON lines (TensorFlow's own
lines included)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import keras
import pytest

from devkit import ROOT

pytestmark = pytest.mark.timeout(120)


def _save(path: Path, *layers: keras.layers.Layer, functional=None) -> Path:
    model = functional or keras.Sequential([keras.Input(shape=(None, 2)), *layers], name="refused")
    model.save(path)
    return path


def _attention(path: Path) -> Path:
    x = keras.Input(shape=(None, 2))
    h = keras.layers.LSTM(4, return_sequences=True)(x)
    attended = keras.layers.MultiHeadAttention(num_heads=1, key_dim=4, name="self_attention")(h, h)
    return _save(path, functional=keras.Model(x, keras.layers.Dense(1)(attended), name="attn"))


# (what the model has, how to build it, the layer the message must name, what it must say)
REFUSED = [
    ("bidirectional", lambda p: _save(p, keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True),
                                                                    name="both_ways")),
     "both_ways", "later timesteps"),
    ("go_backwards", lambda p: _save(p, keras.layers.GRU(4, go_backwards=True, return_sequences=True,
                                                         name="backwards_gru")),
     "backwards_gru", "later timesteps"),
    ("causal_conv1d", lambda p: _save(p, keras.layers.Conv1D(4, 3, padding="causal", name="causal_conv"),
                                      keras.layers.LSTM(4, return_sequences=True)),
     "causal_conv", "mixes timesteps within a chunk"),
    ("pooling", lambda p: _save(p, keras.layers.LSTM(4, return_sequences=True),
                                keras.layers.AveragePooling1D(2, padding="same", name="smoothing")),
     "smoothing", "mixes timesteps within a chunk"),
    ("attention", _attention, "self_attention", "mixes timesteps within a chunk"),
]


@pytest.mark.parametrize(("build", "layer", "reason"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_model_that_cannot_be_streamed_is_refused_naming_the_layer(tmp_path: Path, build, layer, reason) -> None:
    from server.config import ServerConfig
    from server.model.runner import ModelLoadError, ModelRunner

    path = build(tmp_path / "model.keras")
    config = ServerConfig()
    with pytest.raises(ModelLoadError) as refused:
        ModelRunner(path, config.max_chunk_timesteps, xla=False, max_batch=config.max_batch,
                    numpy_max_batch_timesteps=config.numpy_max_batch_timesteps)
    assert f"'{layer}'" in str(refused.value) and reason in str(refused.value)


def _lstm_serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a stderr line is not JSON: {line!r}\nstderr:\n{stderr}") from None
    return entries


def test_an_unstreamable_model_exits_2_with_one_error_line_and_json_only(tmp_path: Path, redis_server) -> None:
    path = REFUSED[0][1](tmp_path / "bidi.keras")
    result = _lstm_serve("--model", str(path), "--redis-url", redis_server.url, "--redis-autostart", "false")
    assert result.returncode == 2, result.stderr[-3000:]
    entries = _json_lines(result.stderr)  # TensorFlow was imported: its own lines must be JSON too
    errors = [e for e in entries if e["level"] in ("error", "critical")]
    assert len(errors) == 1 and "both_ways" in errors[0]["msg"] and "later timesteps" in errors[0]["msg"], errors
    assert result.stdout == ""


class _NotRedis(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet test output
        pass


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotRedis)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("form", ["http", "garbage", "bad-port", "not-redis"])
def test_every_bad_redis_url_exits_2_with_one_clear_line(form: str, http_port: int) -> None:
    url, expected = {
        "http": ("http://127.0.0.1:6379/0", "not a Redis URL"),
        "garbage": ("garbage", "not a Redis URL"),
        "bad-port": ("redis://127.0.0.1:99999/0", "not a Redis URL"),
        "not-redis": (f"redis://127.0.0.1:{http_port}/0", "not a Redis server"),
    }[form]
    for autostart in ("true", "false"):
        result = _lstm_serve("--redis-url", url, "--redis-autostart", autostart)
        assert result.returncode == 2, result.stderr
        (entry,) = _json_lines(result.stderr)
        assert entry["level"] == "error" and expected in entry["msg"], entry
        assert "Traceback" not in result.stderr
