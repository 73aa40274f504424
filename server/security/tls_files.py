"""The certificate files of TLS on the gRPC port: read, checked, and noticed when they change.

Checked before use with the ssl module: it proves that the key belongs to the certificate and that the
client CA file parses, which grpc would only find out at the first handshake (and refuse every client
from then on). A file caught half-written (it changed while being read) or an encrypted key is refused
too. server/api/tls.py turns the checked bytes into grpc credentials.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from server.security.files import file_signature


class TlsFileError(ValueError):
    """The certificate files cannot be used; the message says which and why (never their contents)."""


@dataclass(frozen=True, slots=True)
class CertificateBytes:
    cert: bytes
    key: bytes
    client_ca: bytes | None  # None without mutual TLS


class CertificateFiles:
    def __init__(self, cert_path: str, key_path: str, client_ca_path: str = "") -> None:
        self.paths = tuple(path for path in (cert_path, key_path, client_ca_path) if path)
        self.cert_path, self.key_path, self.client_ca_path = cert_path, key_path, client_ca_path

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_path)

    def signatures(self) -> tuple[object, ...]:
        return tuple(file_signature(path) for path in self.paths)

    def read(self) -> CertificateBytes:
        """The files' bytes, once they proved usable; TlsFileError says why they are not."""
        before = [self._read_file(path) for path in self.paths]
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
        return CertificateBytes(after[0], after[1], after[2] if self.client_ca_path else None)

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
