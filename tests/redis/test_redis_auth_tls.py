"""Issue 9: credentials and TLS work in every Redis mode.

- one node over TLS (`rediss://`, a CA made in the test) as an ACL user (`user:password@`);
- a Redis Cluster whose nodes require a password;
- a Sentinel-managed master and replica that require a password (the sentinels do not: they are
  reached without the master's credentials, which the URL carries for the master alone);
- sentinels that require a password of their own, given as the URL's `sentinel_password` parameter;
- a Sentinel-managed master, replica and sentinels, and a Redis Cluster (its bus too), that speak TLS
  only (`rediss://`, the CA in the URL).
A chunk continues its stream in each, and a wrong password stops the server at start-up (exit 2).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devkit.native_calls import continue_a_stream
from devkit.processes import free_port, serve_until_exit, start_until_exit
from devkit.redis_topologies import NodeProcess, RedisClusterNodes, SentinelGroup, sentinel_flags, stream_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
PASSWORD = "s3cret-pass"


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it, as PEM files."""
    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    files = {"ca": folder / "ca.pem", "cert": folder / "redis.pem", "key": folder / "redis.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def test_one_node_over_tls_as_an_acl_user(start_server, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    port = free_port()
    node = NodeProcess(port, [
        "port 0", f"tls-port {port}", f"tls-cert-file {tls['cert']}", f"tls-key-file {tls['key']}",
        f"tls-ca-cert-file {tls['ca']}", "tls-auth-clients no", "appendonly no",
        f"user lstm on >{PASSWORD} ~lstm:* &* +@all", "user default off",
    ], client_options={"username": "lstm", "ssl": True, "ssl_ca_certs": str(tls["ca"])}, password=PASSWORD)
    try:
        url = f"rediss://lstm:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tls['ca']}"
        continue_a_stream(start_server(redis_url=url).stub)
        wrong = serve_until_exit("--redis-autostart", "false", "--redis-url", url.replace(PASSWORD, "wrong"))
        assert wrong.returncode == 2, wrong.stderr
    finally:
        node.stop()


def test_cluster_with_a_password(start_server) -> None:
    cluster = RedisClusterNodes(masters=3, password=PASSWORD)
    try:
        continue_a_stream(start_server("--redis-cluster", redis_url=cluster.url).stub)
    finally:
        cluster.stop()


def test_sentinel_with_a_password(start_server) -> None:
    group = SentinelGroup(replicas=1, sentinels=1, password=PASSWORD)
    try:
        continue_a_stream(start_server(*group.server_flags, redis_url=f"redis://:{PASSWORD}@127.0.0.1/0").stub)
    finally:
        group.stop()


def test_sentinels_with_a_password_of_their_own(start_server, tmp_path: Path) -> None:
    sentinel_password = "sentinel-s3cret"
    group = SentinelGroup(replicas=1, sentinels=2, password=PASSWORD, sentinel_password=sentinel_password)
    url = f"redis://:{PASSWORD}@127.0.0.1/0"
    try:
        # The three refusals first, all at once and beside the server's start: each is the server's start-up
        # check waiting out redis-py's retries on a refused sentinel (seconds, idle), so each names one
        # sentinel of the two (the refusal is one sentinel's answer; the others' would repeat it).
        refusals = []
        for number, (given, refusal) in enumerate((
                (url, "requires a password: give the sentinels' own in --redis-url as ?sentinel_password=..."),
                (f"{url}?sentinel_password=not-the-s3cret", "refused the sentinel credentials in --redis-url"),
                # The sentinels take theirs, the master they name refuses its own: refused at start-up as on one
                # node (it used to start and never become ready).
                (f"redis://:not-the-s3cret@127.0.0.1/0?sentinel_password={sentinel_password}",
                 "the master the sentinels name (127.0.0.1:"))):
            url_file = tmp_path / f"redis-url-{number}"
            url_file.write_text(given + "\n")
            refusals.append((start_until_exit("--redis-url-file", str(url_file),
                                              *sentinel_flags(group.sentinels[:1])), refusal))
        server = start_server(*group.server_flags, redis_url=f"{url}?sentinel_password={sentinel_password}")
        continue_a_stream(server.stub)
        assert sentinel_password not in server.log()  # the start-up line shows the URL with it masked
        for finish, refusal in refusals:
            refused = finish()
            assert refused.returncode == 2, refused.stderr
            assert refusal in refused.stderr and "not-the-s3cret" not in refused.stderr, refused.stderr
    finally:
        group.stop()


def test_sentinel_over_tls(start_server, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    group = SentinelGroup(replicas=1, sentinels=1, tls=tls)
    try:
        url = f"rediss://127.0.0.1/0?ssl_ca_certs={tls['ca']}"
        continue_a_stream(start_server(*group.server_flags, redis_url=url).stub)
    finally:
        group.stop()


def test_cluster_over_tls(start_server, tmp_path: Path) -> None:
    cluster = RedisClusterNodes(masters=3, tls=make_tls_files(tmp_path))
    try:
        server = start_server("--redis-cluster", redis_url=cluster.url)
        for _ in range(24):  # streams on every master (a third each): the nodes redis-py found over TLS
            continue_a_stream(server.stub)
        assert all(stream_keys(node) > 0 for node in cluster.nodes)
    finally:
        cluster.stop()
