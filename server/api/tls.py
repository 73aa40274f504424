"""TLS and mutual TLS on the gRPC port, with certificates replaced without a restart.

grpcio's dynamic server credentials (`grpc.dynamic_ssl_server_credentials`) ask a fetcher for the
certificate configuration at every new TLS handshake; what the fetcher returns is used from then on,
and connections already open keep theirs. This works with grpc.aio's `add_secure_port` (checked with
grpcio 1.85: the fetcher is called on a gRPC core thread, so it only hands over a configuration that
the event loop prepared). Files are re-read on SIGHUP or when they change (the server polls them), and
checked before use: a certificate that does not match its key, or a file caught half-written, is
refused with a log line and the previous certificate stays in force.
"""

from __future__ import annotations

import ssl
import threading

import grpc

from server.security.tenants import file_signature


class TlsFileError(ValueError):
    """The certificate files cannot be used; the message says which and why (never their contents)."""


class ReloadingCredentials:
    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = "") -> None:
        self.paths = tuple(path for path in (cert_path, key_path, client_ca_path) if path)
        self.cert_path, self.key_path, self.client_ca_path = cert_path, key_path, client_ca_path
        self._signature = self._signatures()
        self._initial = self._read()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # the fetcher runs on gRPC's threads, reload on the event loop

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_path)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new configuration, or None to keep the current one."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def changed(self) -> bool:
        return self._signatures() != self._signature

    def reload(self) -> None:
        """Read the files again for the next handshakes; raises TlsFileError and keeps the old ones."""
        self._signature = self._signatures()
        configuration = self._read()
        with self._lock:
            self._pending = configuration

    def _signatures(self) -> tuple[object, ...]:
        return tuple(file_signature(path) for path in self.paths)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        before = [self._read_file(path) for path in self.paths]
        # The ssl module proves that the key belongs to the certificate and the CA file parses; grpc
        # would only find out at the first handshake, and refuse every client from then on.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert_path, self.key_path, password=self._encrypted_key)
            if self.client_ca_path:
                context.load_verify_locations(cafile=self.client_ca_path)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFileError(
                f"cannot use certificate {self.cert_path} with key {self.key_path}"
                + (f" and client CA {self.client_ca_path}" if self.client_ca_path else "")
                + f": {exc.__class__.__name__}: {getattr(exc, 'reason', None) or exc.strerror or 'unreadable'}"
            ) from None
        after = [self._read_file(path) for path in self.paths]
        if before != after:
            raise TlsFileError("the certificate files changed while being read; they will be read again")
        cert, key = after[0], after[1]
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=after[2] if self.client_ca_path else None
        )

    def _encrypted_key(self) -> bytes:
        # Without this callback OpenSSL would prompt for a passphrase on the terminal, and grpc cannot
        # use an encrypted key anyway.
        raise TlsFileError(f"{self.key_path} is encrypted; give the key without a passphrase "
                           "(`openssl pkey -in KEY -out KEY.plain`) and protect the file instead")

    @staticmethod
    def _read_file(path: str) -> bytes:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise TlsFileError(f"cannot read {path}: {exc.strerror}") from None
