"""TLS, mutual TLS, API keys and tenants against running servers (invariants 12 and 13, docs/invariants.md).

Two servers in all (TensorFlow start-up costs seconds each):
- `guarded`, shared by the module: mutual TLS, API keys for five tenants (three with limits), Redis with
  a password that the server reads from a file. Plaintext, client certificates, keys on both
  protocols and on the HTTP port, tenant namespaces, per-tenant limits, Envoy in front, and no secret
  in its output.
- one in the rotation test: TLS without client certificates, API keys; its certificate and key file
  are replaced while it runs (SIGHUP, then a change alone), and connections opened before keep working.

This process imports tritonclient's generated `inference.*` messages (like tests/serving/test_triton_protocol.py),
so it never imports the server's own `lstm_stream.triton`.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from devkit import ROOT
from devkit.certs import CertificateAuthority
from devkit.native_calls import outputs, request
from devkit.processes import RedisServer, ServerProcess, free_port, wait_until
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(240)

TIMEOUT_S = 30
KEYS = {tenant: f"{tenant}-{secrets.token_hex(16)}" for tenant in ("alpha", "beta", "gamma", "delta", "epsilon")}
WRONG_KEY = f"wrong-{secrets.token_hex(16)}"
GAMMA_MAX_STREAMS = 2


def bearer(tenant_or_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS.get(tenant_or_key, tenant_or_key)}"),)


def new_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def sequence(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, 1)).astype(np.float32)


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a streaming call fails when its answers are read
            list(result)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call succeeded but was expected to fail")


# --- certificates, keys, servers --------------------------------------------------------------------


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = CertificateAuthority("test CA")
        self.other_ca = CertificateAuthority("another CA")
        self.ca_path = folder / "ca.crt"
        self.ca_path.write_bytes(self.ca.pem)
        self.server_cert, self.server_key = self.ca.issue("server", server=True).write(folder, "server")
        self.client = self.ca.issue("sensor gateway", server=False)
        self.foreign_client = self.other_ca.issue("intruder", server=False)

    def credentials(self, *, client: object = "ca", trust: bytes | None = None) -> grpc.ChannelCredentials:
        issued = {"ca": self.client, "foreign": self.foreign_client, None: None}[client]  # type: ignore[index]
        return grpc.ssl_channel_credentials(
            root_certificates=trust or self.ca.pem,
            private_key=issued.key_pem if issued else None,
            certificate_chain=issued.cert_pem if issued else None,
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(Path(tempfile.mkdtemp(prefix="lstm-pki-")))


@pytest.fixture(scope="module")
def redis_password() -> str:
    return secrets.token_hex(12)


@pytest.fixture(scope="module")
def locked_redis(redis_password: str) -> Iterator[RedisServer]:
    server = RedisServer(appendonly=False, password=redis_password)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(pki: Pki, locked_redis: RedisServer) -> Iterator[ServerProcess]:
    url_file = pki.folder / "redis-url"
    url_file.write_text(locked_redis.url + "\n")
    keys_file = pki.folder / "api-keys"
    keys_file.write_text(
        "# tenant  key  [limits]\n"
        f"alpha {KEYS['alpha']}\n"
        f"beta  {KEYS['beta']}   # a comment after a key\n"
        f"gamma {KEYS['gamma']} max_streams={GAMMA_MAX_STREAMS}\n"
        f"delta {KEYS['delta']} chunks_per_s=0.01\n"
        f"epsilon {KEYS['epsilon']} chunks_per_s=0.01\n"  # the HTTP port's own rate test
    )
    server = ServerProcess(
        None, DEFAULT_MODEL, "--redis-url-file", str(url_file), "--api-keys", str(keys_file),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca_path),
        credentials=pki.credentials(),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def native(guarded: ServerProcess) -> stream_pb2_grpc.StreamInferenceStub:
    return guarded.stub


@pytest.fixture(scope="module")
def triton_stub(guarded: ServerProcess) -> triton_pb2_grpc.GRPCInferenceServiceStub:
    return triton_pb2_grpc.GRPCInferenceServiceStub(guarded.channel)


@pytest.fixture(scope="module")
def triton_client(pki: Pki, guarded: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client_cert, client_key = pki.client.write(pki.folder, "client")
    with triton.InferenceServerClient(
        url=guarded.address, ssl=True, root_certificates=str(pki.ca_path), private_key=str(client_key),
        certificate_chain=str(client_cert),
    ) as client:
        yield client


# --- TLS and mutual TLS ----------------------------------------------------------------------------------


def health_of(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """A health check over a new connection of its own (never one shared with another channel)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with (grpc.secure_channel(address, credentials, options) if credentials
          else grpc.insecure_channel(address, options)) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_mutual_tls_accepts_only_clients_signed_by_the_ca(pki: Pki, guarded: ServerProcess) -> None:
    assert health_of(guarded.address, pki.credentials()) == grpc.StatusCode.OK
    assert health_of(guarded.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert health_of(guarded.address, pki.credentials(client=None)) == grpc.StatusCode.UNAVAILABLE
    assert health_of(guarded.address, pki.credentials(client="foreign")) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA refuses the server.
    assert health_of(guarded.address, pki.credentials(trust=pki.other_ca.pem)) == grpc.StatusCode.UNAVAILABLE


def test_the_container_health_check_speaks_mutual_tls(pki: Pki, guarded: ServerProcess) -> None:
    client_cert, client_key = pki.client.write(pki.folder, "probe")
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LSTM_SERVE_")}

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.healthcheck", "--address", guarded.address, *args],
                              cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30)

    ok = probe("--tls-ca", str(pki.ca_path), "--client-cert", str(client_cert), "--client-key", str(client_key),
               "--server-name", "localhost")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("SERVING"), ok
    assert probe("--timeout", "2").returncode == 1  # plaintext
    assert probe("--tls-ca", str(pki.ca_path), "--timeout", "2").returncode == 1  # no client certificate


# --- API keys, both protocols, unary and streaming ----------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), bearer(WRONG_KEY), (("authorization", KEYS["alpha"]),)],
                         ids=["missing", "unknown", "not-bearer"])
def test_native_calls_need_a_known_key(native, metadata) -> None:
    stream = new_id("auth")
    chunk = request(stream, sequence(1, 3))
    calls = [
        (native.Predict, chunk),
        (native.PredictStream, iter([chunk])),
        (native.ResetStream, pb.ResetStreamRequest(stream_id=stream)),
        (native.GetStream, pb.GetStreamRequest(stream_id=stream)),
        (native.GetModel, pb.GetModelRequest()),
    ]
    for call, message in calls:
        code, details = code_of(call, message, metadata=metadata, timeout=TIMEOUT_S)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (call, details)
        assert WRONG_KEY not in details and KEYS["alpha"] not in details
    # Nothing was applied: the same stream is new to its rightful tenant.
    assert not native.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer("alpha"),
                                timeout=TIMEOUT_S).exists


def test_grpc_call_credentials_carry_the_key_as_the_readme_shows(pki: Pki, guarded: ServerProcess) -> None:
    key = grpc.access_token_call_credentials(KEYS["alpha"])  # sends `authorization: Bearer <key>`
    with grpc.secure_channel(guarded.address, grpc.composite_channel_credentials(pki.credentials(), key)) as channel:
        model = stream_pb2_grpc.StreamInferenceStub(channel).GetModel(pb.GetModelRequest(), timeout=TIMEOUT_S)
    assert model.input_features == 1


def test_the_project_client_carries_tls_and_the_key(pki: Pki, guarded: ServerProcess) -> None:
    from lstm_stream.client import Client  # clients/python: the library the README points users to

    client_cert, client_key = pki.client.write(pki.folder, "library")
    with Client(guarded.address, tls_ca=str(pki.ca_path), client_cert=(str(client_cert), str(client_key)),
                api_key=KEYS["beta"]) as client:
        stream = client.stream(new_id("library"))
        assert stream.send(sequence(10, 4)).shape[0] == 4
        assert stream.info().offset == 4


def test_triton_calls_need_a_known_key(triton_stub) -> None:
    infer = triton_pb2.ModelInferRequest(model_name="default", inputs=[
        triton_pb2.ModelInferRequest.InferInputTensor(
            name="INPUT", datatype="FP32", shape=[2, 1],
            contents=triton_pb2.InferTensorContents(fp32_contents=[0.5, 0.25]))])
    infer.parameters["sequence_id"].string_param = new_id("triton-auth")
    infer.parameters["sequence_start"].bool_param = True
    calls = [
        (triton_stub.ModelInfer, infer),
        (triton_stub.ModelStreamInfer, iter([infer])),
        (triton_stub.ServerMetadata, triton_pb2.ServerMetadataRequest()),
        (triton_stub.ModelMetadata, triton_pb2.ModelMetadataRequest(name="default")),
        (triton_stub.ServerLive, triton_pb2.ServerLiveRequest()),
    ]
    for metadata in ((), bearer(WRONG_KEY)):
        for call, message in calls:
            code, details = code_of(call, message, metadata=metadata, timeout=TIMEOUT_S)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (call, details)
            assert WRONG_KEY not in details
    reply = triton_stub.ModelInfer(infer, metadata=bearer("beta"), timeout=TIMEOUT_S)
    assert reply.parameters["sequence_offset"].int64_param == 2


def test_health_stays_open_and_reflection_needs_a_key(guarded: ServerProcess) -> None:
    health = health_pb2_grpc.HealthStub(guarded.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    code, _ = code_of(reflection.ServerReflectionInfo, iter([ask]), timeout=TIMEOUT_S)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    replies = reflection.ServerReflectionInfo(iter([ask]), metadata=bearer("alpha"), timeout=TIMEOUT_S)
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert "lstm_stream.v1.StreamInference" in names


# --- tenants: one stream id, two namespaces ----------------------------------------------------------------


def test_native_tenants_never_see_each_others_streams(native, locked_redis: RedisServer) -> None:
    shared = new_id("shared")
    x_alpha, x_beta = sequence(2, 12), sequence(3, 7)

    def call(tenant: str, x: np.ndarray, **flags: object) -> pb.PredictResponse:
        return native.Predict(request(shared, x, **flags), metadata=bearer(tenant), timeout=TIMEOUT_S)

    first_alpha = call("alpha", x_alpha[:8])
    first_beta = call("beta", x_beta[:4], start_offset=0)
    assert (first_alpha.offset, first_beta.offset) == (8, 4)
    # Beta's first chunk started from zero state: the same as a stream alpha never touched before.
    fresh = native.Predict(request(new_id("fresh"), x_beta[:4]), metadata=bearer("alpha"), timeout=TIMEOUT_S)
    np.testing.assert_array_equal(outputs(first_beta), outputs(fresh))

    def info(tenant: str) -> pb.StreamInfo:
        return native.GetStream(pb.GetStreamRequest(stream_id=shared), metadata=bearer(tenant), timeout=TIMEOUT_S)

    assert (info("alpha").offset, info("beta").offset) == (8, 4)
    assert not info("gamma").exists
    # Alpha's reset forgets alpha's stream only; beta continues where it stood.
    assert native.ResetStream(pb.ResetStreamRequest(stream_id=shared), metadata=bearer("alpha"),
                              timeout=TIMEOUT_S).existed
    assert not info("alpha").exists and info("beta").offset == 4
    assert call("beta", x_beta[4:], start_offset=4).offset == 7
    # Gamma cannot reset beta's stream either: it has none of that name.
    assert not native.ResetStream(pb.ResetStreamRequest(stream_id=shared), metadata=bearer("gamma"),
                                  timeout=TIMEOUT_S).existed
    assert info("beta").offset == 7
    # Each tenant's slot is its own Redis key; nothing is kept under the key without tenant.
    keys = set(locked_redis.client().keys(f"lstm:*{shared}*"))
    assert keys == {f"lstm:beta:{{{shared}}}".encode()}


def test_triton_tenants_never_see_each_others_sequences(triton_client) -> None:
    sequence_id, x = new_id("pump"), sequence(4, 10)

    def infer(tenant: str, chunk: np.ndarray, sequence: str = sequence_id, **options: object) -> triton.InferResult:
        tensor = triton.InferInput("INPUT", list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk)
        return triton_client.infer("default", [tensor], sequence_id=sequence, headers=dict(bearer(tenant)),
                                   client_timeout=TIMEOUT_S, **options)

    def offset(result: triton.InferResult) -> int:
        return result.get_response().parameters["sequence_offset"].int64_param

    assert offset(infer("alpha", x[:6], sequence_start=True)) == 6
    # Beta continuing the "same" sequence finds no state of its own: Triton's missing START.
    with pytest.raises(InferenceServerException) as refused:
        infer("beta", x[6:])
    assert "FAILED_PRECONDITION" in str(refused.value) or "has no state" in str(refused.value)
    beta_start = infer("beta", x[:3], sequence_start=True)
    assert offset(beta_start) == 3
    # Alpha's END ends alpha's sequence, not beta's.
    assert offset(infer("alpha", x[6:], sequence_end=True)) == 10
    # Beta's START began from zero state, like a sequence alpha never used.
    fresh = infer("alpha", x[:3], new_id("fresh"), sequence_start=True, sequence_end=True)
    np.testing.assert_array_equal(beta_start.as_numpy("OUTPUT"), fresh.as_numpy("OUTPUT"))

    # Over the bidirectional stream too: beta continues its own sequence at offset 3.
    answers: queue.Queue = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: answers.put(error or result),
                               headers=dict(bearer("beta")))
    try:
        tensor = triton.InferInput("INPUT", [4, 1], "FP32")
        tensor.set_data_from_numpy(x[3:7])
        triton_client.async_stream_infer("default", [tensor], sequence_id=sequence_id)
        answer = answers.get(timeout=TIMEOUT_S)
    finally:
        triton_client.stop_stream()
    assert not isinstance(answer, Exception), answer
    assert answer.get_response().parameters["sequence_offset"].int64_param == 7


# --- per-tenant limits ---------------------------------------------------------------------------------------


def test_live_stream_limit_applies_to_its_tenant_only(native) -> None:
    def send(tenant: str, stream: str, **flags: object) -> pb.PredictResponse:
        return native.Predict(request(stream, sequence(5, 2), **flags), metadata=bearer(tenant), timeout=TIMEOUT_S)

    streams = [new_id("gamma") for _ in range(GAMMA_MAX_STREAMS + 2)]
    for stream in streams[:GAMMA_MAX_STREAMS]:
        send("gamma", stream)
    code, details = code_of(send, "gamma", streams[GAMMA_MAX_STREAMS])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "live streams" in details
    assert not native.GetStream(pb.GetStreamRequest(stream_id=streams[GAMMA_MAX_STREAMS]),
                                metadata=bearer("gamma"), timeout=TIMEOUT_S).exists
    # Streams already live go on; other tenants are not limited by gamma's count.
    assert send("gamma", streams[0]).offset == 4
    for _ in range(GAMMA_MAX_STREAMS + 1):
        send("alpha", new_id("alpha-many"))
    # Ending one stream and resetting another free their places.
    send("gamma", streams[0], end=True)
    assert send("gamma", streams[GAMMA_MAX_STREAMS]).offset == 2
    native.ResetStream(pb.ResetStreamRequest(stream_id=streams[1]), metadata=bearer("gamma"), timeout=TIMEOUT_S)
    assert send("gamma", streams[GAMMA_MAX_STREAMS + 1]).offset == 2


def test_chunk_rate_applies_to_its_tenant_only(native, guarded: ServerProcess) -> None:
    # delta may send 0.01 chunks/s: one chunk of burst, the next in 100 s.
    stream = new_id("delta")
    assert native.Predict(request(stream, sequence(6, 2)), metadata=bearer("delta"), timeout=TIMEOUT_S).offset == 2
    code, details = code_of(native.Predict, request(stream, sequence(6, 2)), metadata=bearer("delta"),
                            timeout=TIMEOUT_S)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "chunks/s" in details
    # On a stream, the refused chunk is answered with an error and the stream goes on.
    replies = list(native.PredictStream(iter([request(stream, sequence(7, 1))]), metadata=bearer("delta"),
                                        timeout=TIMEOUT_S))
    assert replies[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert native.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer("delta"),
                            timeout=TIMEOUT_S).offset == 2
    for _ in range(3):
        native.Predict(request(new_id("alpha-fast"), sequence(8, 1)), metadata=bearer("alpha"), timeout=TIMEOUT_S)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{guarded.metrics_port}/metrics", timeout=5).read().decode()
    assert 'lstm_serve_tenant_chunks_total{code="RESOURCE_EXHAUSTED",tenant="delta"}' in metrics
    assert 'lstm_serve_tenant_chunks_total{code="OK",tenant="alpha"}' in metrics


# --- Envoy in front: it terminates the clients' TLS and passes `authorization` through -------------------------

ENVOY_CONFIG = """
static_resources:
  listeners:
    - name: grpc
      address: {socket_address: {address: 127.0.0.1, port_value: %(listen_port)d}}
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context:
                alpn_protocols: ["h2"]
                tls_certificates:
                  - {certificate_chain: {filename: "%(server_cert)s"}, private_key: {filename: "%(server_key)s"}}
                validation_context: {trusted_ca: {filename: "%(ca)s"}}
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": %(manager_type)s
                stat_prefix: grpc
                codec_type: AUTO
                route_config:
                  virtual_hosts:
                    - name: lstm_serve
                      domains: ["*"]
                      routes: [{match: {prefix: "/"}, route: {cluster: lstm_serve, timeout: 0s}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
    - name: lstm_serve
      type: STATIC
      connect_timeout: 2s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {http2_protocol_options: {}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
              - {certificate_chain: {filename: "%(client_cert)s"}, private_key: {filename: "%(client_key)s"}}
            validation_context: {trusted_ca: {filename: "%(ca)s"}}
      health_checks:
        - {timeout: 1s, interval: 1s, unhealthy_threshold: 2, healthy_threshold: 1, grpc_health_check: {}}
      load_assignment:
        cluster_name: lstm_serve
        endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1,
                                                                           port_value: %(server_port)d}}}}]}]
"""


def test_envoy_terminates_tls_and_passes_the_api_key_through(pki: Pki, guarded: ServerProcess) -> None:
    client_cert, client_key = pki.client.write(pki.folder, "envoy-client")
    listen_port = free_port()
    config = pki.folder / "envoy.yaml"
    config.write_text(ENVOY_CONFIG % {
        "listen_port": listen_port, "server_port": guarded.port, "ca": pki.ca_path, "server_cert": pki.server_cert,
        "server_key": pki.server_key, "client_cert": client_cert, "client_key": client_key,
        "manager_type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                        "HttpConnectionManager",
    })
    envoy_log = pki.folder / "envoy.log"
    with open(envoy_log, "wb") as log:
        envoy = subprocess.Popen([str(Path(sys.executable).parent / "envoy"), "-c", str(config), "--concurrency", "1",
                                  "--disable-hot-restart", "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{listen_port}"
    try:
        with grpc.secure_channel(address, pki.credentials()) as channel:
            stub = stream_pb2_grpc.StreamInferenceStub(channel)

            def answers() -> bool:
                assert envoy.poll() is None, envoy_log.read_text()
                try:
                    stub.GetModel(pb.GetModelRequest(), metadata=bearer("alpha"), timeout=5)
                    return True
                except grpc.RpcError:
                    return False

            wait_until(answers, 30, "Envoy to route to the server")
            stream = new_id("via-envoy")
            assert stub.Predict(request(stream, sequence(9, 3)), metadata=bearer("beta"), timeout=TIMEOUT_S).offset == 3
            assert code_of(stub.Predict, request(stream, sequence(9, 3)), timeout=TIMEOUT_S)[0] == \
                grpc.StatusCode.UNAUTHENTICATED
            # The tenant is the key's, through Envoy as directly: beta's stream, not alpha's.
            direct = guarded.stub.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer("beta"),
                                            timeout=TIMEOUT_S)
            assert direct.offset == 3
        # Envoy's listener wants a client certificate too.
        assert health_of(address, pki.credentials(client=None)) == grpc.StatusCode.UNAVAILABLE
    finally:
        envoy.terminate()
        envoy.wait(10)


# --- secrets never in the output (last: after every call above) ---------------------------------------------


def test_no_key_and_no_redis_password_in_the_output(guarded: ServerProcess, redis_password: str) -> None:
    log = guarded.log()
    assert '"msg": "serving"' in log and ":***@127.0.0.1" in log
    for secret in (*KEYS.values(), WRONG_KEY, redis_password):
        assert secret not in log


# --- rotation: certificates and keys replaced while serving ---------------------------------------------------


def https_status(server: ServerProcess, ca_file: Path, key: str) -> int | None:
    """GET /v1/model on the HTTP port over a new connection trusting only `ca_file`: the status, or None when the
    handshake fails (the server's certificate is not signed by that CA)."""
    with requests.Session() as session:
        session.trust_env = False  # REQUESTS_CA_BUNDLE would win over `verify`
        try:
            return session.get(f"https://127.0.0.1:{server.http_port}/v1/model", verify=str(ca_file),
                               headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S).status_code
        except requests.exceptions.SSLError:
            return None


def test_certificates_and_keys_reload_without_a_restart(pki: Pki, redis_server: RedisServer) -> None:
    """On the gRPC port and the HTTP port alike: the same files, the same reload."""
    folder = Path(tempfile.mkdtemp(prefix="lstm-rotate-"))
    old_ca, new_ca = CertificateAuthority("old CA"), CertificateAuthority("new CA")
    old_ca_file, new_ca_file = folder / "old-ca.crt", folder / "new-ca.crt"
    old_ca_file.write_bytes(old_ca.pem)
    new_ca_file.write_bytes(new_ca.pem)
    cert, key = old_ca.issue("server", server=True).write(folder, "server")
    old_key, new_key = f"old-{secrets.token_hex(16)}", f"new-{secrets.token_hex(16)}"
    keys_file = folder / "keys"
    keys_file.write_text(f"ops {old_key}\n")
    trust_old = grpc.ssl_channel_credentials(root_certificates=old_ca.pem)
    trust_new = grpc.ssl_channel_credentials(root_certificates=new_ca.pem)
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--tls-cert", str(cert), "--tls-key", str(key),
                           "--api-keys", str(keys_file), credentials=trust_old)
    kept_https = requests.Session()  # one HTTP keep-alive connection, opened before the rotation and kept
    kept_https.trust_env = False
    kept_https.verify = str(old_ca_file)
    try:
        # TLS without client certificates; plaintext refused.
        assert health_of(server.address, None) == grpc.StatusCode.UNAVAILABLE
        existing = server.stub  # one connection, opened now and kept
        existing.GetModel(pb.GetModelRequest(), metadata=bearer(old_key), timeout=TIMEOUT_S)
        model_url = f"https://127.0.0.1:{server.http_port}/v1/model"
        assert kept_https.get(model_url, headers={"Authorization": f"Bearer {old_key}"},
                              timeout=TIMEOUT_S).status_code == 200
        assert https_status(server, new_ca_file, old_key) is None

        # Replace everything, then SIGHUP.
        new_issued = new_ca.issue("server", server=True)
        key.write_bytes(new_issued.key_pem)
        cert.write_bytes(new_issued.cert_pem)
        keys_file.write_text(f"ops {new_key}\n")
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: health_of(server.address, trust_new) == grpc.StatusCode.OK, 20,
                   "new connections to get the new certificate")
        assert health_of(server.address, trust_old) == grpc.StatusCode.UNAVAILABLE
        # The HTTP port reloaded with it: new handshakes get the new certificate, and the new key only.
        assert https_status(server, new_ca_file, new_key) == 200
        assert https_status(server, new_ca_file, old_key) == 401
        assert https_status(server, old_ca_file, new_key) is None
        with grpc.secure_channel(server.address, trust_new) as channel:
            fresh = stream_pb2_grpc.StreamInferenceStub(channel)
            fresh.GetModel(pb.GetModelRequest(), metadata=bearer(new_key), timeout=TIMEOUT_S)
            assert code_of(fresh.GetModel, pb.GetModelRequest(), metadata=bearer(old_key),
                           timeout=TIMEOUT_S)[0] == grpc.StatusCode.UNAUTHENTICATED
        # The connection opened before the rotation still works (it trusts only the old CA, so a
        # new connection would fail): the new key in, the old key out.
        existing.GetModel(pb.GetModelRequest(), metadata=bearer(new_key), timeout=TIMEOUT_S)
        assert code_of(existing.GetModel, pb.GetModelRequest(), metadata=bearer(old_key),
                       timeout=TIMEOUT_S)[0] == grpc.StatusCode.UNAUTHENTICATED
        # So does the HTTP connection opened before.
        assert kept_https.get(model_url, headers={"Authorization": f"Bearer {new_key}"},
                              timeout=TIMEOUT_S).status_code == 200

        # A certificate that does not match its key is refused; the current one stays.
        refusals = server.log().count("TLS certificates not reloaded")
        key.write_bytes(old_ca.issue("other", server=True).key_pem)
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log().count("TLS certificates not reloaded") > refusals, 20,
                   "the refusal to be logged")
        assert health_of(server.address, trust_new) == grpc.StatusCode.OK
        assert https_status(server, new_ca_file, new_key) == 200

        # Without a signal: a change of the files is noticed by itself.
        back = old_ca.issue("server", server=True)
        cert.write_bytes(back.cert_pem)
        key.write_bytes(back.key_pem)
        wait_until(lambda: health_of(server.address, trust_old) == grpc.StatusCode.OK, 20,
                   "the changed certificate to be picked up")
        assert https_status(server, old_ca_file, new_key) == 200
        log = server.log()
        assert old_key not in log and new_key not in log
    finally:
        kept_https.close()
        server.stop()


# --- the HTTP port: the same certificates, keys, tenants and limits as gRPC ------------------------------------


def http_session(pki: Pki, cert: tuple[Path, Path] | None) -> requests.Session:
    """Trusting the test CA only: without trust_env=False, a REQUESTS_CA_BUNDLE in the environment would win over
    `verify` and every handshake would fail for the wrong reason."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(pki.ca_path)
    session.cert = (str(cert[0]), str(cert[1])) if cert else None
    return session


@pytest.fixture(scope="module")
def https(pki: Pki, guarded: ServerProcess) -> Iterator[requests.Session]:
    """A session that presents the CA-signed client certificate and trusts the test CA."""
    with http_session(pki, pki.client.write(pki.folder, "http-client")) as session:
        yield session


def http_url(guarded: ServerProcess, path: str) -> str:
    return f"https://127.0.0.1:{guarded.http_port}{path}"


def test_http_port_speaks_mutual_tls_only(pki: Pki, guarded: ServerProcess, https: requests.Session) -> None:
    assert https.get(http_url(guarded, "/v2/health/live"), timeout=TIMEOUT_S).status_code == 200
    foreign = pki.foreign_client.write(pki.folder, "http-intruder")
    for cert in (None, foreign):  # no client certificate, or one the CA did not sign
        with http_session(pki, cert) as session, pytest.raises(requests.exceptions.ConnectionError):
            session.get(http_url(guarded, "/v2/health/live"), timeout=TIMEOUT_S)
    with http_session(pki, None) as session, pytest.raises(requests.exceptions.ConnectionError):  # plaintext
        session.get(f"http://127.0.0.1:{guarded.http_port}/v2/health/live", timeout=TIMEOUT_S)


def test_http_needs_a_known_key_and_shares_tenants_with_grpc(guarded: ServerProcess, https: requests.Session,
                                                            native) -> None:
    stream = new_id("http-shared")
    predict_path = f"/v1/streams/{stream}:predict"
    body = {"values": [[0.1], [0.2]], "start_offset": 0}
    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": KEYS["alpha"]}):
        refused = https.post(http_url(guarded, predict_path), json=body, headers=headers, timeout=TIMEOUT_S)
        assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHENTICATED"
        assert refused.headers["WWW-Authenticate"] == "Bearer" and KEYS["alpha"] not in refused.text
    assert https.get(http_url(guarded, "/v2"), timeout=TIMEOUT_S).status_code == 401
    # Health stays open, as gRPC's: load balancers and probes carry no keys.
    assert https.get(http_url(guarded, "/v2/health/ready"), timeout=TIMEOUT_S).status_code == 200

    def key(tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[tenant]}"}

    answer = https.post(http_url(guarded, predict_path), json=body, headers=key("alpha"), timeout=TIMEOUT_S)
    assert answer.status_code == 200 and answer.json()["offset"] == "2"
    # One tenant across both ports: alpha's gRPC call sees the stream alpha wrote over HTTP; beta has none.
    assert native.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer("alpha"),
                            timeout=TIMEOUT_S).offset == 2
    assert https.get(http_url(guarded, f"/v1/streams/{stream}"), headers=key("beta"),
                     timeout=TIMEOUT_S).json()["exists"] is False
    infer = {"parameters": {"sequence_id": stream},
             "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 1], "data": [0.3]}]}
    beta = https.post(http_url(guarded, "/v2/models/default/infer"), json=infer, headers=key("beta"),
                      timeout=TIMEOUT_S)
    assert beta.status_code == 409  # beta's sequence of that name never started
    alpha = https.post(http_url(guarded, "/v2/models/default/infer"), json=infer, headers=key("alpha"),
                       timeout=TIMEOUT_S)
    assert alpha.status_code == 200 and alpha.json()["parameters"]["sequence_offset"] == 3


def test_http_chunk_rate_answers_429_and_applies_nothing(guarded: ServerProcess, https: requests.Session,
                                                         native) -> None:
    # epsilon may send 0.01 chunks/s: one chunk of burst, the next in 100 s.
    stream = new_id("epsilon")
    headers = {"Authorization": f"Bearer {KEYS['epsilon']}"}
    url = http_url(guarded, f"/v1/streams/{stream}:predict")
    assert https.post(url, json={"values": [[0.1]], "start_offset": 0}, headers=headers,
                      timeout=TIMEOUT_S).status_code == 200
    refused = https.post(url, json={"values": [[0.2]], "start_offset": 1}, headers=headers, timeout=TIMEOUT_S)
    assert refused.status_code == 429 and refused.json()["code"] == "RESOURCE_EXHAUSTED"
    assert refused.headers["x-chunk-outcome"] == "not-applied"
    assert native.GetStream(pb.GetStreamRequest(stream_id=stream), metadata=bearer("epsilon"),
                            timeout=TIMEOUT_S).offset == 1
