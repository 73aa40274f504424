"""Which async HTTP server the REST port is built on (issue 27): two candidates on one trivial infer-like handler.

    python -m bench.http_servers                 # each server 10 s at 64 concurrent clients
    python -m bench.http_servers --seconds 5

The candidates run the way the server would run them: inside an asyncio loop that is already running (beside
grpc.aio), started by an `await`, not by their own `run()`:
- aiohttp: `aiohttp.web` with an AppRunner and a TCPSite;
- uvicorn + starlette: a Starlette app under `uvicorn.Server.serve()` (httptools, uvicorn's fast parser; and h11,
  its pure-Python one).
The handler is the same for each: read a JSON body (a KServe v2 infer request of 20 x 4 FP32 values), parse it,
sum it, answer a small JSON document (the infer response's shape), as the REST edge does before the data plane.

The load is 64 concurrent keep-alive connections (plain asyncio streams in a process of its own) for a fixed time.
Figures: requests/s, and the server process's CPU microseconds per request read from /proc (user + system),
which holds however busy the machine is (the load generator shares the 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

CLIENTS = 64
BODY = json.dumps({
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [20, 4], "data": [0.25] * 80}],
    "parameters": {"sequence_id": 42, "sequence_start": True},
}).encode()


def _answer(request: dict) -> bytes:
    total = sum(request["inputs"][0]["data"])
    return json.dumps({"model_name": "default", "model_version": "1",
                       "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [1, 3], "data": [total] * 3}]
                       }).encode()


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=_answer(json.loads(await request.read())), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _serve_uvicorn(port: int, parser: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        return Response(_answer(json.loads(await request.body())), media_type="application/json")

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=parser, lifespan="off", access_log=False,
                            log_level="warning")
    await uvicorn.Server(config).serve()


SERVERS = {
    "aiohttp": lambda port: _serve_aiohttp(port),
    "uvicorn+starlette (httptools)": lambda port: _serve_uvicorn(port, "httptools"),
    "uvicorn+starlette (h11)": lambda port: _serve_uvicorn(port, "h11"),
}


def _serve(name: str, port: int) -> None:
    asyncio.run(SERVERS[name](port))


async def _load(port: int, seconds: float) -> tuple[int, int]:
    """64 keep-alive connections, one request in flight on each. Plain asyncio streams rather than an HTTP client
    library: the load generator shares the 2 cores, so the less CPU it takes, the more the servers get."""
    request = (f"POST /v2/models/default/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    done = errors = 0
    stop_at = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200"):
                    done += 1
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return done, errors


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def measure(name: str, seconds: float) -> dict[str, object]:
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(name, port), daemon=True)
    server.start()
    try:
        _wait_listening(port)
        asyncio.run(_load(port, 1.0))  # warm-up: connections open, code paths hot
        cpu_before = _cpu_seconds(server.pid)
        started = time.perf_counter()
        done, errors = asyncio.run(_load(port, seconds))
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.join(5)
    return {"server": name, "requests": done, "errors": errors, "requests_per_s": round(done / elapsed),
            "server_cpu_us_per_request": round(cpu / max(done, 1) * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("results") / "http_servers.json")
    args = parser.parse_args()
    import aiohttp
    import uvicorn
    versions = {"aiohttp": aiohttp.__version__, "uvicorn": uvicorn.__version__,
                "starlette": subprocess.run([sys.executable, "-c", "import starlette; print(starlette.__version__)"],
                                            capture_output=True, text=True).stdout.strip()}
    rows = [measure(name, args.seconds) for name in SERVERS]
    for row in rows:
        print(f"{row['server']:32} {row['requests_per_s']:>7} req/s  {row['server_cpu_us_per_request']:>7} us CPU/req"
              f"  ({row['errors']} errors)")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "clients": CLIENTS, "seconds": args.seconds,
              "versions": versions, "rows": rows}
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
