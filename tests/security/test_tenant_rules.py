"""The security pieces on their own, in process: the key file, key lookup, the per-tenant chunk rate, the
live-stream count in a real Redis, tenant key layout and batching, the TLS files and
the configuration checks (invariants 12 and 13, docs/invariants.md). tests/security/test_security.py runs them
in real servers."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from devkit.certs import CertificateAuthority
from devkit.processes import free_port, wait_until
from server.api.auth import bearer_token
from server.api.tls import ReloadingCredentials
from server.config import load_config
from server.dataplane.batcher import Batcher
from server.errors import ServiceError
from server.security.limits import ChunkRate, TenantLimits
from server.security.tenants import KeyFileError, parse_key_file
from server.security.tls_files import TlsFileError
from server.state.live import Change, LiveChange, LiveStreams
from server.state.store import StateStore
from server.types import Chunk, Prediction

pytestmark = pytest.mark.timeout(60)

KEY_A, KEY_A2, KEY_B = (secrets.token_hex(16) for _ in range(3))


# --- the key file ----------------------------------------------------------------------------------------


def test_key_file_maps_keys_to_tenants_with_their_limits() -> None:
    directory = parse_key_file(
        "# who may call\n"
        f"\n  team-a   {KEY_A}   # first key\n"
        f"Team_B.2 {KEY_B} max_streams=10 chunks_per_s=2.5\n"
        f"team-a {KEY_A2}\n",
        TenantLimits(max_streams=100, chunks_per_s=0),
    )
    assert directory.tenant_of(KEY_A) == "team-a" and directory.tenant_of(KEY_A2) == "team-a"
    assert directory.tenant_of(KEY_B) == "Team_B.2"
    assert directory.tenant_of(KEY_A[:-1]) is None and directory.tenant_of(KEY_A + "x") is None
    assert directory.tenant_of("") is None
    assert directory.limits == {"team-a": TenantLimits(100, 0.0), "Team_B.2": TenantLimits(10, 2.5)}
    assert KEY_A.encode() not in repr(directory).encode()  # only keyed digests are kept
    # Limits given on any one of a tenant's lines hold for all its keys.
    directory = parse_key_file(f"t {KEY_A}\nt {KEY_B} max_streams=3\nt {KEY_A2}\n")
    assert directory.limits == {"t": TenantLimits(3, 0.0)}


# Each bad key file and the problem its refusal names; the test ids are the problems, since the keys are random.
BAD_KEY_FILES = [
    (f"a:b {KEY_A}", "line 1: a tenant name is"),
    (f"a{{b}} {KEY_A}", "a tenant name is"),
    (f"{'x' * 65} {KEY_A}", "a tenant name is"),
    ("team short-key", "at least 16"),
    (f"{KEY_A} team", "line 1: a key is at least 16"),  # columns swapped: the key is not echoed
    (f"team {KEY_A}\nother {KEY_A}", "line 2: this key is listed twice"),
    (f"team {KEY_A} max_streams=lots", "max_streams must be a number"),
    (f"team {KEY_A} chunks_per_s=-1", "0 (no limit) or a positive"),
    (f"team {KEY_A} {KEY_B}", "after the key only max_streams=N"),
    (f"team {KEY_A} max_streams=1\nteam {KEY_B} max_streams=2", "line 2: this tenant has other limits on line 1"),
    (f"{KEY_A}", "line 1: expected `TENANT KEY"),
    ("# nobody\n", "no keys"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_KEY_FILES, ids=[problem for _, problem in BAD_KEY_FILES])
def test_a_bad_key_file_is_refused_by_line_without_showing_a_key(text: str, problem: str) -> None:
    with pytest.raises(KeyFileError) as refused:
        parse_key_file(text)
    assert problem in str(refused.value)
    assert KEY_A not in str(refused.value) and KEY_B not in str(refused.value)


def test_bearer_token_reads_the_authorization_metadata() -> None:
    assert bearer_token((("x-other", "1"), ("authorization", f"Bearer {KEY_A}"))) == KEY_A
    assert bearer_token((("authorization", f"bearer  {KEY_A} "),)) == KEY_A
    assert bearer_token((("authorization", f"Basic {KEY_A}"),)) is None
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token(()) is None and bearer_token(None) is None


# --- per-tenant chunk rate ---------------------------------------------------------------------------------


def test_chunk_rate_is_a_token_bucket_per_tenant() -> None:
    now = [0.0]
    limits = {"slow": TenantLimits(chunks_per_s=2), "free": TenantLimits()}
    rate = ChunkRate(limits.__getitem__, clock=lambda: now[0])
    assert [rate.allow("slow") for _ in range(3)] == [True, True, False]  # one second's worth of burst
    assert all(rate.allow("free") for _ in range(1000))
    now[0] += 0.5  # one more token
    assert [rate.allow("slow"), rate.allow("slow")] == [True, False]
    now[0] += 60  # refills up to the burst, not beyond
    assert [rate.allow("slow") for _ in range(3)] == [True, True, False]


# --- live streams per tenant, in Redis --------------------------------------------------------------------


def test_live_streams_count_admits_refreshes_ends_and_expires(redis_server) -> None:
    async def scenario() -> None:
        store = StateStore(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:6]}")
        live = LiveStreams(store, state_ttl_ms=60_000, limit_of=lambda tenant: 2 if tenant == "small" else 0)
        now = int(time.time() * 1000)
        deadline = time.monotonic() + 10

        async def apply(changes: list[LiveChange], at_ms: int = now) -> list[bool]:
            return await live.apply(changes, at_ms, deadline)

        def change(stream: str, kind: Change, tenant: str = "small") -> LiveChange:
            return LiveChange(tenant, stream, kind)

        assert await apply([change("a", Change.NEW), change("b", Change.NEW), change("c", Change.NEW),
                            change("x", Change.NEW, "big")]) == [True, True, False, True]
        # A live stream is never refused, even at the limit; a repeated NEW of it neither.
        assert await apply([change("a", Change.CONTINUE), change("b", Change.NEW)]) == [True, True]
        assert await apply([change("a", Change.END), change("c", Change.NEW)]) == [True, True]
        assert await apply([change("d", Change.NEW)]) == [False]
        await live.forget("small", "b", deadline)
        assert await apply([change("d", Change.NEW)]) == [True]
        # Idle past the state TTL: pruned, as the streams' own states would have expired.
        assert await apply([change("e", Change.NEW), change("f", Change.NEW)], now + 60_001) == [True, True]
        assert await store.client.zcard(live.key("small")) == 2
        assert not await store.client.exists(live.key("big"))  # unlimited tenants are not counted
        await store.close()

    asyncio.run(scenario())


# --- tenant namespaces in the store and the batcher ----------------------------------------------------------


def test_each_tenant_has_its_own_key_and_no_key_without_tenant_changes() -> None:
    store = StateStore("redis://127.0.0.1:1/0", key_prefix="lstm")
    assert store.key("s-1") == "lstm:{s-1}"
    assert store.key("s-1", "team-a") == "lstm:team-a:{s-1}"
    assert len({store.key("s", ""), store.key("s", "a"), store.key("s", "b"), store.key("a:{s}")}) == 4


def test_same_stream_id_of_two_tenants_is_two_streams_that_may_share_a_batch() -> None:
    batches: list[list[tuple[str, str | None]]] = []

    async def process(chunks):
        batches.append([(c.tenant, c.stream_id) for c in chunks])
        await asyncio.sleep(0.01)
        return [Prediction(c.stream_id, c.values, 0) for c in chunks]

    async def scenario() -> None:
        batcher = Batcher(process, max_batch=8, max_delay_s=0.0, max_in_flight=1, max_queued=100)
        batcher.start()
        values = np.zeros((1, 1), np.float32)
        blocker = batcher.submit(Chunk("other", values))  # runs alone, while the rest queue up
        await asyncio.sleep(0)
        waiting = [batcher.submit(Chunk("s", values, tenant=t)) for t in ("a", "b", "a", "")]
        await asyncio.gather(blocker, *waiting)
        await batcher.stop()

    asyncio.run(scenario())
    assert batches[1] == [("a", "s"), ("b", "s"), ("", "s")]  # one batch, three streams
    assert batches[2] == [("a", "s")]  # tenant a's second chunk waits for its first


# --- secrets out of logs, TLS files, configuration ------------------------------------------------------------


def test_tls_files_are_checked_before_use(tmp_path: Path) -> None:
    ca = CertificateAuthority("unit CA")
    cert, key = ca.issue("server", server=True).write(tmp_path, "server")
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.pem)
    credentials = ReloadingCredentials(str(cert), str(key), str(ca_path))
    assert credentials.mutual and isinstance(credentials.credentials(), grpc.ServerCredentials)
    assert credentials._fetch() is None and not credentials.changed()  # nothing new: keep the current one
    other = ca.issue("server", server=True)
    key.write_bytes(other.key_pem)
    assert credentials.changed()
    with pytest.raises(TlsFileError, match="cannot use certificate"):
        credentials.reload()  # the key no longer matches the certificate
    assert credentials._fetch() is None
    cert.write_bytes(other.cert_pem)
    credentials.reload()
    assert credentials._fetch() is not None and credentials._fetch() is None  # handed over once
    with pytest.raises(TlsFileError, match="cannot read"):
        ReloadingCredentials(str(tmp_path / "missing.crt"), str(key))
    # An encrypted key is refused with a message, never with a passphrase prompt on the terminal.
    encrypted = serialization.load_pem_private_key(other.key_pem, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    key.write_bytes(encrypted)
    with pytest.raises(TlsFileError, match="is encrypted"):
        ReloadingCredentials(str(cert), str(key))


def test_configuration_of_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text("redis://:s3cret-pw@redis:6379/0\n")
    assert load_config(["--redis-url-file", str(url_file)], environ={}).redis_url == "redis://:s3cret-pw@redis:6379/0"
    config = load_config([], environ={"LSTM_SERVE_REDIS_URL_FILE": str(url_file)})
    assert config.redis_url.endswith("@redis:6379/0") and config.metrics_host == "127.0.0.1"
    url_file.write_text("s3cret-pw\n")
    refusals = [
        ["--redis-url-file", str(url_file)],  # not a URL: refused without echoing it
        ["--redis-url-file", str(tmp_path / "missing")],
        ["--redis-url-file", str(url_file), "--redis-url", "redis://other:6379/0"],
        ["--tls-cert", "server.crt"],
        ["--tls-client-ca", "ca.crt"],
        ["--tenant-max-streams", "5"],
    ]
    for argv in refusals:
        with pytest.raises(SystemExit):
            load_config(argv, environ={})
    assert "s3cret-pw" not in capsys.readouterr().err



def test_state_store_reaches_redis_over_tls_with_a_password(tmp_path: Path) -> None:
    """What docs/security.md tells operators to do: Redis behind TLS and a password, named by a rediss:// URL."""
    ca = CertificateAuthority("redis CA")
    cert, key = ca.issue("redis", server=True).write(tmp_path, "redis")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    password, port = secrets.token_hex(12), free_port()
    (tmp_path / "redis.conf").write_text(f"requirepass {password}\n")
    redis_process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", str(tmp_path / "redis.conf"), "--bind", "127.0.0.1",
         "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )

    async def ping(url: str) -> bool:
        store = StateStore(url, key_prefix="lstm")
        try:
            return await store.ping()
        except ServiceError:
            return False
        finally:
            await store.close()

    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}"
    try:
        wait_until(lambda: asyncio.run(ping(url)), 10, "redis-server with TLS")
        assert not asyncio.run(ping(url.replace(password, "wrong-password")))
        assert not asyncio.run(ping(f"redis://:{password}@127.0.0.1:{port}/0"))  # plaintext to the TLS port
    finally:
        redis_process.terminate()
        redis_process.wait(10)
