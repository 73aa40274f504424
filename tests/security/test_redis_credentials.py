"""No message carries a Redis credential, whatever the URL looks like (issue 24, item 6).

A password with an unencoded '#', '/' or '?' ends the URL's host part for urllib and redis-py: before the
fix `--redis-url 'redis://:hunter2longpw#tail@127.0.0.1:16401/0'` exited 2 logging
"Port could not be cast to integer value as 'hunter2longpw'". Now such a URL is refused before anything
parses it, with the URL masked and the way to percent-encode the password; every other message that
could quote a URL's pieces is scrubbed. Checked on the whole output of `lstm-serve`, in every mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from urllib.parse import quote

import numpy as np
import pytest

from devkit import ROOT
from devkit.native_calls import predict
from devkit.processes import RedisServer, free_port
from server.redis_addresses import parse_sentinels, url_spelling_problem
from server.security.redact import redact_url, scrub, secrets_in

pytestmark = pytest.mark.timeout(300)

# The characters the issue names; each password also has distinctive pieces on both sides.
SPECIALS = ["#", "/", "?", "@", ":", "%"]
MODES = {
    "single": [],
    "cluster": ["--redis-cluster", "true"],
    "sentinel": ["--redis-sentinels", "127.0.0.1:1", "--redis-sentinel-master", "mymaster"],
}


def _password(special: str) -> str:
    return f"Head{uuid.uuid4().hex[:8]}{special}Tail{uuid.uuid4().hex[:8]}"


def _pieces(password: str) -> list[str]:
    """The password and every distinctive piece of it (what a leak would show)."""
    head, tail = password[:12], password[-12:]
    return [password, head, tail]


def _lstm_serve(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "0", "--redis-url", url, *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _assert_no_secret(text: str, password: str) -> None:
    for piece in _pieces(password):
        assert piece not in text, f"{piece!r} leaked:\n{text[-3000:]}"


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("user", ["", "app"])
def test_redact_url_masks_a_password_even_in_a_malformed_url(special: str, user: str) -> None:
    password = _password(special)
    for url in (f"redis://{user}:{password}@127.0.0.1:16401/0", f"rediss://{user}:{password}@h:6380/1?db=1",
                f"redis://{user}:{password}@127.0.0.1:16401/0?sentinel_password={password}",
                f"unix://{user}:{password}@/run/redis.sock", f"{user}:{password}@127.0.0.1:16401"):
        shown = redact_url(url)
        _assert_no_secret(shown, password)
        assert "***" in shown
        # What a parser may say about the URL is scrubbed of every piece of the password.
        _assert_no_secret(scrub(f"Port could not be cast to integer value as {password[:12]!r}; {password}", url),
                          password)


def test_redact_url_keeps_what_is_not_secret() -> None:
    assert redact_url("redis://app:a%23b@127.0.0.1:6379/2") == "redis://app:***@127.0.0.1:6379/2"
    assert redact_url("redis://:p#w@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0?ssl_password=x&db=3") == "redis://127.0.0.1:6379/0?ssl_password=***&db=3"
    assert set(secrets_in("redis://:hunter2longpw#tail@127.0.0.1:16401/0")) >= {"hunter2longpw", "tail"}


@pytest.mark.parametrize("special", ["#", "/", "?", "%"])
def test_an_unencoded_special_character_is_named_and_the_encoded_url_is_accepted(special: str) -> None:
    password = _password(special)
    problem = url_spelling_problem(f"redis://app:{password}@127.0.0.1:6379/0")
    assert problem is not None and "%23" in problem and "%25" in problem
    _assert_no_secret(problem, password)
    assert url_spelling_problem(f"redis://app:{quote(password, safe='')}@127.0.0.1:6379/0") is None


@pytest.mark.parametrize("special", ["@", ":"])
def test_an_at_sign_or_colon_in_the_password_is_read_as_written(special: str) -> None:
    from redis.connection import parse_url

    password = _password(special)
    url = f"redis://app:{password}@127.0.0.1:6379/0"
    assert url_spelling_problem(url) is None
    assert parse_url(url)["password"] == password and parse_url(url)["host"] == "127.0.0.1"


def test_a_sentinel_address_with_credentials_is_refused_without_quoting_them() -> None:
    password = _password("")
    with pytest.raises(ValueError) as refused:
        parse_sentinels(f"127.0.0.1:26379,user:{password}@127.0.0.1:26380")
    _assert_no_secret(str(refused.value), password)
    assert "sentinel_password" in str(refused.value)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_malformed_url_never_shows_its_password_in_any_mode(mode: str) -> None:
    """Exit 2, one line that says how to percent-encode, and no piece of the password in the whole output."""
    port = free_port()
    for special in ("#", "/", "?", "%"):
        for user in ("", "app"):
            password = _password(special)
            for autostart in (("true", "false") if mode == "single" else ("true",)):
                result = _lstm_serve(f"redis://{user}:{password}@127.0.0.1:{port}/0", *MODES[mode],
                                     "--redis-autostart", autostart)
                output = result.stdout + result.stderr
                assert result.returncode == 2, output[-3000:]
                _assert_no_secret(output, password)
                assert "bad --redis-url" in output and "percent-encode" in output and "Traceback" not in output


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_a_refused_password_is_not_shown_and_the_message_says_how_to_encode(mode: str) -> None:
    real = RedisServer(appendonly=False, password=f"real{uuid.uuid4().hex}")
    try:
        for special in SPECIALS:
            password = _password(special)
            url = f"redis://app:{quote(password, safe='')}@127.0.0.1:{real.port}/0"
            result = _lstm_serve(url, *MODES[mode], "--redis-autostart", "false")
            output = result.stdout + result.stderr
            assert result.returncode == 2, output[-3000:]
            _assert_no_secret(output, password)
            assert "refused the credentials" in output and "%23" in output
    finally:
        real.stop()


def test_a_password_with_every_special_character_serves_and_never_reaches_the_log(start_server) -> None:
    password = f"Head{uuid.uuid4().hex[:8]}#/?@:% Tail{uuid.uuid4().hex[:8]}"
    real = RedisServer(appendonly=False)
    try:
        real.client().config_set("requirepass", password)
        server = start_server(redis_url=f"redis://:{quote(password, safe='')}@127.0.0.1:{real.port}/0")
        predict(server.stub, f"specials-{uuid.uuid4().hex[:6]}", np.ones((2, 1), np.float32), start_offset=0)
        real.kill()  # Redis errors are logged and answered too
        with pytest.raises(Exception):  # noqa: B017 - any gRPC error: what matters is the log below
            predict(server.stub, "after-redis-died", np.ones((2, 1), np.float32), timeout=10)
        server.stop()
        log = server.log()
        assert "serving" in log
        _assert_no_secret(log, password)
        _assert_no_secret(log, quote(password, safe=""))
    finally:
        real.kill()
