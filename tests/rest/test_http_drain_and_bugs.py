"""The HTTP port's drain and its answer to a bug: the statuses no healthy request produces.

SIGTERM: /v2/health/ready reads 503 at once while requests are still served (the drain delay), then new
requests get 503 UNAVAILABLE with Retry-After, and a request accepted before the drain is still answered.
A bug in a handler is answered 500 INTERNAL naming the exception, and the server goes on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import requests

from devkit import ROOT
from devkit.processes import ServerProcess, wait_until

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 30
ONE_SHOT = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}


def in_flight_http(server: ServerProcess) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=TIMEOUT_S).text
    for line in text.splitlines():
        if line.startswith('lstm_serve_in_flight_calls{protocol="http"}'):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_turns_ready_false_then_answers_503_with_retry_after(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--drain-delay-s", "1", "--shutdown-grace-s", "25", "--request-deadline-s", "20")
    infer_url = f"{server.http_url}/v2/models/default/infer"
    # A request whose body is still on its way: accepted before the drain, it keeps the port open and is answered.
    body = json.dumps(ONE_SHOT).encode()
    slow = socket.create_connection(("127.0.0.1", server.http_port), timeout=TIMEOUT_S)
    try:
        slow.sendall(f"POST /v2/models/default/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body[:10])
        wait_until(lambda: in_flight_http(server) >= 1, TIMEOUT_S, "the slow request to reach its handler")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: requests.get(f"{server.http_url}/v2/health/ready", timeout=TIMEOUT_S).status_code == 503,
                   TIMEOUT_S, "ready to read 503")
        # A list around the answer: a requests.Response of 503 is falsy, and wait_until waits for a truthy result.
        [refused] = wait_until(lambda: (answer := requests.post(infer_url, json=ONE_SHOT, timeout=TIMEOUT_S))
                               .status_code == 503 and [answer], TIMEOUT_S, "new requests to be refused")
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["code"] == "UNAVAILABLE" and "draining" in refused.json()["error"]
        slow.sendall(body[10:])
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        slow.close()
    assert server.process.wait(TIMEOUT_S) == 0


# Run in a child process: the REST edge imports the server's own Triton messages (lstm_stream.triton), which
# cannot share a process with tritonclient's, and a pytest process may hold those (devkit/peers.py).
BUGGY_APP = """
import asyncio, json, aiohttp, grpc
from aiohttp import web
from server.api.interceptors import Drain
from server.api.rest import HTTP_STATUS, RestApi

assert set(HTTP_STATUS) == set(grpc.StatusCode), "every gRPC code has its HTTP status"

async def main():
    # The edge alone, around a handler with a bug: no request to the real servicers can produce one.
    api = RestApi(None, None, Drain(), None, lambda: True, body_limit=1024, body_timeout_s=5)
    app = web.Application(middlewares=[api.edge])

    async def broken(request):
        raise RuntimeError("a bug")

    async def fine(request):
        return web.Response(text="ok")

    app.router.add_get("/broken", broken, name="Broken")
    app.router.add_get("/fine", fine, name="Fine")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/broken") as answer:
                print(json.dumps({"status": answer.status, "body": await answer.json()}))
            async with session.get(f"http://127.0.0.1:{port}/fine") as after:
                print(json.dumps({"status": after.status}))
    finally:
        await runner.cleanup()

asyncio.run(main())
"""


def test_a_bug_in_a_handler_answers_500_naming_it() -> None:
    path = os.pathsep.join(str(folder) for folder in (ROOT, ROOT / "clients" / "python"))
    done = subprocess.run([sys.executable, "-c", BUGGY_APP], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    broken, after = (json.loads(line) for line in done.stdout.splitlines())
    assert broken["status"] == 500 and broken["body"]["code"] == "INTERNAL"
    assert "RuntimeError: a bug" in broken["body"]["error"]
    assert "unexpected error in HTTP" in done.stderr  # logged with its traceback
    assert after["status"] == 200
