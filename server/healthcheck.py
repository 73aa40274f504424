"""`python -m server.healthcheck`: ask the local server's own grpc.health.v1 service whether it serves.

Exit 0 when the answer is SERVING, 1 otherwise (NOT_SERVING while Redis is unreachable or the server
drains, no answer, or no server): the contract of a container HEALTHCHECK and of an exec probe. It
reads the same LSTM_SERVE_* variables as the server, so in the image it needs no arguments, and it
imports only grpc: a check costs a fraction of a second, not a TensorFlow import.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import load_config

CHECK_TIMEOUT_S = 3.0
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]", "": "127.0.0.1"}


def local_address(environ: dict[str, str]) -> str:
    """Where the server configured by these LSTM_SERVE_* variables can be reached from its own host."""
    config = load_config([], environ)
    host = WILDCARD_HOSTS.get(config.host, config.host)
    return f"{host}:{config.port}"


def check(address: str, service: str = "", timeout_s: float = CHECK_TIMEOUT_S) -> tuple[bool, str]:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 if the server's grpc.health.v1 service answers SERVING, else 1.",
    )
    parser.add_argument("--address", help="HOST:PORT to ask (default: from LSTM_SERVE_HOST and LSTM_SERVE_PORT, "
                        "with a wildcard host asked on loopback)")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=CHECK_TIMEOUT_S, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    address = args.address or local_address(dict(os.environ))
    healthy, line = check(address, args.service, args.timeout)
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
