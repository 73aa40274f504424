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


def tls_credentials(ca: str, client_cert: str = "", client_key: str = "") -> grpc.ChannelCredentials:
    """TLS to a server started with --tls-cert; a client certificate too when it has --tls-client-ca."""
    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as handle:
            return handle.read()

    return grpc.ssl_channel_credentials(read(ca), read(client_key), read(client_cert))


def check(address: str, service: str = "", timeout_s: float = CHECK_TIMEOUT_S,
          credentials: grpc.ChannelCredentials | None = None, server_name: str = "") -> tuple[bool, str]:
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with (grpc.secure_channel(address, credentials, options) if credentials
          else grpc.insecure_channel(address)) as channel:
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
    # A server with --tls-cert serves TLS only (docs/security.md); health checking needs no API key.
    parser.add_argument("--tls-ca", default="", help="speak TLS, trusting this CA file (the one that signed the "
                        "server's certificate)")
    parser.add_argument("--server-name", default="", help="name to expect in the server's certificate when it "
                        "does not cover the address asked (for example `server` when asking 127.0.0.1)")
    parser.add_argument("--client-cert", default="", help="client certificate, for a server with --tls-client-ca")
    parser.add_argument("--client-key", default="", help="its private key")
    args = parser.parse_args(argv)
    address = args.address or local_address(dict(os.environ))
    credentials = tls_credentials(args.tls_ca, args.client_cert, args.client_key) if args.tls_ca else None
    healthy, line = check(address, args.service, args.timeout, credentials, args.server_name)
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
