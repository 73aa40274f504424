"""The client's TLS, mutual TLS and API key, seen from the server side of a real gRPC connection.

What is under test is the client: its channel credentials (CA, client certificate and key, as paths
or bytes) and the `authorization: Bearer KEY` metadata on unary and streaming calls. The far end is
a real grpc server in this process with real certificates (made here with `cryptography`) and a
minimal stand-in of the StreamInference service that records what each call carried; the real
server's key and TLS checking is issue 10's and is tested there.
"""

from __future__ import annotations

import datetime
import ipaddress
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lstm_stream.client import Client, ServerUnavailable
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)


def make_cert(name: str, issuer: tuple | None = None, *, ca: bool = False) -> tuple[bytes, bytes, tuple]:  # type: ignore[type-arg]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, (subject, key)


class Recorder(pb_grpc.StreamInferenceServicer):
    """Answers like an identity model (outputs = inputs) and keeps what every call carried."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], list[bytes]]] = []

    def _seen(self, method: str, context: grpc.ServicerContext) -> None:
        peer_names = context.auth_context().get("x509_common_name", [])
        self.calls.append((method, dict(context.invocation_metadata()), list(peer_names)))

    def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        self._seen("GetModel", context)
        return pb.ModelInfo(name="stand-in", input_features=1, output_size=1, max_chunk_timesteps=64,
                            per_timestep_outputs=True)

    def _answer(self, request: pb.PredictRequest) -> pb.PredictResponse:
        return pb.PredictResponse(stream_id=request.stream_id, outputs=request.values, timesteps=request.timesteps,
                                  output_size=1, offset=request.start_offset + request.timesteps,
                                  request_id=request.request_id)

    def Predict(self, request, context):  # type: ignore[no-untyped-def]
        self._seen("Predict", context)
        return self._answer(request)

    def PredictStream(self, requests, context):  # type: ignore[no-untyped-def]
        self._seen("PredictStream", context)
        for request in requests:
            yield self._answer(request)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path | bytes]:
    ca_pem, _, ca = make_cert("test-ca", ca=True)
    server_pem, server_key, _ = make_cert("localhost", ca)
    client_pem, client_key, _ = make_cert("gateway-7", ca)
    files = {"ca": ca_pem, "server": server_pem, "server_key": server_key, "client": client_pem,
             "client_key": client_key}
    for name, data in files.items():
        (tmp_path / f"{name}.pem").write_bytes(data)
    return {**files, **{f"{name}_path": tmp_path / f"{name}.pem" for name in files}}  # type: ignore[dict-item]


def serve(recorder: Recorder, credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_StreamInferenceServicer_to_server(recorder, server)
    # Port 0: the server binds a free port and says which; no other process can take it in between.
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


def exercise(client: Client) -> None:
    x = np.arange(10, dtype=np.float32)
    assert client.model().name == "stand-in"
    stream = client.stream("cred-1")
    got = np.concatenate([stream.send(x[:4]), *stream.pipe([x[4:7], x[7:]])])
    assert np.array_equal(got.ravel(), x)


def test_mutual_tls_and_api_key_reach_the_server(pki) -> None:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    credentials = grpc.ssl_server_credentials([(pki["server_key"], pki["server"])], root_certificates=pki["ca"],
                                              require_client_auth=True)
    server, address = serve(recorder, credentials)
    try:
        with Client(address, tls_ca=pki["ca_path"], client_cert=(pki["client_path"], pki["client_key_path"]),
                    api_key="k-123") as client:  # paths
            exercise(client)
        with Client(address, tls_ca=pki["ca"], client_cert=(pki["client"], pki["client_key"]),
                    api_key="k-456") as client:  # bytes
            exercise(client)
        assert {method for method, _, _ in recorder.calls} == {"GetModel", "Predict", "PredictStream"}
        keys = [metadata.get("authorization") for _, metadata, _ in recorder.calls]
        assert set(keys) == {"Bearer k-123", "Bearer k-456"}
        assert all(names == [b"gateway-7"] for _, _, names in recorder.calls)
        # Without a client certificate the server refuses the handshake: retried, then unavailable.
        with Client(address, tls_ca=pki["ca"], deadline=1.5, attempt_timeout=0.5) as client, \
                pytest.raises(ServerUnavailable):
            client.model()
    finally:
        server.stop(0)


def test_plaintext_api_key(pki) -> None:  # type: ignore[no-untyped-def]
    recorder = Recorder()
    server, address = serve(recorder, None)
    try:
        with Client(address, api_key="plain-key") as client:
            exercise(client)
        with Client(address) as client:
            client.model()
        keys = [metadata.get("authorization") for _, metadata, _ in recorder.calls]
        assert keys[:-1] == ["Bearer plain-key"] * (len(keys) - 1) and keys[-1] is None
    finally:
        server.stop(0)
