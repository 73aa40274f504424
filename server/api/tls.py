"""TLS and mutual TLS on the gRPC port, with certificates replaced without a restart.

grpcio's dynamic server credentials (`grpc.dynamic_ssl_server_credentials`) ask a fetcher for the
certificate configuration at every new TLS handshake; what the fetcher returns is used from then on,
and connections already open keep theirs. This works with grpc.aio's `add_secure_port` (checked with
grpcio 1.85: the fetcher is called on a gRPC core thread, so it only hands over a configuration that
the event loop prepared). Files are re-read on SIGHUP or when they change (the server polls them), and
checked before use (server/security/tls_files.py): a certificate that does not match its key, or a
file caught half-written, is refused with a log line and the previous certificate stays in force.

The HTTP/REST port (server/api/rest.py) serves the same files through one `ssl.SSLContext`: a reload loads
the checked files into it again, which new handshakes use (OpenSSL copies the context's certificate into each
new connection), and connections already open keep theirs, as on the gRPC port.
"""

from __future__ import annotations

import ssl
import threading

import grpc

from server.security.tls_files import CertificateFiles, TlsFileError


class ReloadingCredentials:
    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = "") -> None:
        self.files = CertificateFiles(cert_path, key_path, client_ca_path)
        self.paths = self.files.paths
        self._signature = self.files.signatures()
        self._initial = self._read()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # the fetcher runs on gRPC's threads, reload on the event loop
        self._ssl: ssl.SSLContext | None = None  # the HTTP port's, made on first use

    @property
    def mutual(self) -> bool:
        return self.files.mutual

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP port's TLS context: the same certificate, key and client CA (mutual TLS) as gRPC's."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._load_ssl(self._ssl)
        return self._ssl

    def _load_ssl(self, context: ssl.SSLContext) -> None:
        files = self.files
        context.load_cert_chain(files.cert_path, files.key_path)
        if files.client_ca_path:
            context.load_verify_locations(cafile=files.client_ca_path)
            context.verify_mode = ssl.CERT_REQUIRED

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new configuration, or None to keep the current one."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def changed(self) -> bool:
        return self.files.signatures() != self._signature

    def reload(self) -> None:
        """Read the files again for the next handshakes; raises TlsFileError and keeps the old ones."""
        self._signature = self.files.signatures()
        configuration = self._read()
        with self._lock:
            self._pending = configuration
        if self._ssl is not None:
            try:
                self._load_ssl(self._ssl)
            except (OSError, ssl.SSLError) as exc:  # changed again since the check: keep what is loaded
                raise TlsFileError(f"the HTTP port keeps its certificate: {exc}") from None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        pem = self.files.read()
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)], root_certificates=pem.client_ca)
