"""What the configuration asks of the gRPC port: TLS (or not), API keys (or not), and their reloads.

One object so the wiring in server/app/build.py stays a few lines: the interceptors to install, how to
bind the port, and a task that re-reads the key file and the certificates on SIGHUP or when they
change on disk (polled once a second), without dropping a connection. A file that fails to load is
logged and the previous keys or certificates stay in force.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

import grpc

from server.api.auth import ApiKeyInterceptor
from server.api.tls import ReloadingCredentials
from server.config import ServerConfig
from server.errors import StartupError
from server.security.limits import TenantLimits
from server.security.tenants import KeyFileError, Tenants
from server.security.tls_files import TlsFileError

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0


class Security:
    def __init__(self, config: ServerConfig) -> None:
        try:
            self.tenants = (
                Tenants(config.api_keys, TenantLimits(config.tenant_max_streams, config.tenant_chunks_per_s))
                if config.api_keys else None
            )
            self.tls = (
                ReloadingCredentials(config.tls_cert, config.tls_key, config.tls_client_ca)
                if config.tls_cert else None
            )
        except (KeyFileError, TlsFileError) as exc:
            # The one wrap: the same errors at a reload are logged and the server serves on (`reload`).
            raise StartupError(str(exc)) from None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [ApiKeyInterceptor(self.tenants)] if self.tenants else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.credentials())

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the HTTP/REST port: None without TLS, else the same files (and reloads) as the gRPC port."""
        return self.tls.ssl_context() if self.tls else None

    def describe(self) -> dict[str, object]:
        """For the start-up log line: what is on, never a secret."""
        return {
            "tls": "mutual" if self.tls and self.tls.mutual else "on" if self.tls else "off",
            "tenants": self.tenants.directory.tenant_names if self.tenants else None,
        }

    def reload(self, reason: str, *, keys: bool = True, certificates: bool = True) -> None:
        if self.tenants and keys:
            try:
                directory = self.tenants.reload()
                log.info("API keys reloaded", extra={"fields": {"reason": reason, "tenants": directory.tenant_names}})
            except KeyFileError as exc:
                log.error("API keys not reloaded, the previous keys stay in force: %s", exc)
        if self.tls and certificates:
            try:
                self.tls.reload()
                log.info("TLS certificates reloaded for new connections",
                         extra={"fields": {"reason": reason, "files": list(self.tls.paths)}})
            except TlsFileError as exc:
                log.error("TLS certificates not reloaded, the previous ones stay in force: %s", exc)

    def start(self) -> asyncio.Task[None] | None:
        """Reload on SIGHUP (which never stops the server), and when a file changes."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        if not (self.tenants or self.tls):
            return None
        return asyncio.create_task(self._watch(), name="security-files")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            keys = bool(self.tenants and self.tenants.changed())
            certificates = bool(self.tls and self.tls.changed())
            if keys or certificates:
                self.reload("file changed", keys=keys, certificates=certificates)
