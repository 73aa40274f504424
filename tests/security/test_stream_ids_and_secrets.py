"""Stream ids are any UTF-8 text without control characters, on both protocols; no secret in any log.

Invariant 13 (docs/invariants.md): ids of 1 to 256 UTF-8 bytes without control characters (Unicode
category Cc), compared byte for byte (no normalisation). Issue 8, item 7: a Redis password given in
--redis-url never appears in the server's output.
"""

from __future__ import annotations

import subprocess
import sys
import unicodedata
import uuid

import grpc
import numpy as np
import pytest

from devkit import ROOT
from devkit.native_calls import outputs, predict
from devkit.processes import RedisServer, free_port
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.v1 import stream_pb2 as pb
from server.api.validation import MAX_STREAM_ID_BYTES
from server.config import DEFAULT_MODEL
from server.security.redact import redact_url

pytestmark = pytest.mark.timeout(180)

CALL_TIMEOUT_S = 30


def ids() -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [
        f"temp-°C/hall 2 {tag}",
        f"温度/3/{tag}",
        f"{{braces}}-{tag}",
        f"a{{b}}c {tag}",
        f"emoji 🌡️‍ {tag}",  # a zero-width joiner (Cf) is text, not a control character
        "é" * ((MAX_STREAM_ID_BYTES - len(tag)) // 2) + tag,  # 2 bytes per "é" in UTF-8: the longest id
    ]


def test_utf8_ids_continue_like_keras_on_the_native_api(default_server, redis_server) -> None:
    stub = default_server.stub
    x = np.random.default_rng(21).normal(size=(12, 1)).astype(np.float32)
    expected = keras_whole_sequence(DEFAULT_MODEL, x)
    for stream in ids():
        assert len(stream.encode()) <= MAX_STREAM_ID_BYTES
        first = predict(stub, stream, x[:5], start_offset=0)
        second = predict(stub, stream, x[5:], start_offset=5)
        assert first.stream_id == stream and second.offset == 12
        got = np.concatenate([outputs(first), outputs(second)])
        assert np.max(np.abs(got - expected)) <= TOLERANCE, stream
        info = stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=CALL_TIMEOUT_S)
        assert info.exists and info.offset == 12 and info.stream_id == stream
        # The key layout is `<prefix>:{<id>}` with the id's UTF-8 bytes inside, braces and all.
        assert redis_server.client().exists(f"lstm:{{{stream}}}".encode()) == 1
        assert stub.ResetStream(pb.ResetStreamRequest(stream_id=stream), timeout=CALL_TIMEOUT_S).existed
        assert not stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=CALL_TIMEOUT_S).exists


def test_ids_are_compared_byte_for_byte(default_server) -> None:
    stub = default_server.stub
    tag = uuid.uuid4().hex[:6]
    composed = unicodedata.normalize("NFC", f"café-{tag}")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    x = np.ones((3, 1), np.float32)
    predict(stub, composed, x, start_offset=0)
    predict(stub, composed, x, start_offset=3)
    assert predict(stub, decomposed, x, start_offset=0).offset == 3  # a stream of its own
    for stream, offset in ((composed, 6), (decomposed, 3)):
        assert stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=CALL_TIMEOUT_S).offset == offset


def test_utf8_string_sequence_ids_on_the_triton_protocol(default_server) -> None:
    """Triton string sequence ids follow the same rule and reach the same slot as the native id.

    Raw stubs in a child process: this test process may hold tritonclient's messages of the same names.
    """
    stream = f"温度/hall 2 {{°C}} {uuid.uuid4().hex[:6]}"
    script = f"""
import sys
import grpc, numpy as np
from lstm_stream.triton import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel({default_server.address!r}))
def request(sequence_id, start):
    r = pb.ModelInferRequest(model_name="default")
    r.parameters["sequence_id"].string_param = sequence_id
    r.parameters["sequence_start"].bool_param = start
    r.inputs.add(name="INPUT", datatype="FP32", shape=[4, 1])
    r.raw_input_contents.append(np.ones((4, 1), "<f4").tobytes())
    return r
reply = stub.ModelInfer(request({stream!r}, True), timeout=30)
assert reply.parameters["sequence_offset"].int64_param == 4, reply
for bad in ("tab\\there", "x" * 257, "\\x85"):
    try:
        stub.ModelInfer(request(bad, True), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters.sequence_id" in error.details()
    else:
        sys.exit(f"accepted {{bad!r}}")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    info = default_server.stub.GetStream(pb.GetStreamRequest(stream_id=stream), timeout=CALL_TIMEOUT_S)
    assert info.exists and info.offset == 4


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://app:hunter2@10.0.0.5:6380/1", "redis://app:***@10.0.0.5:6380/1"),
    ("rediss://app:hun%40ter2@h:6379/0?password=hunter2&db=1", "rediss://app:***@h:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url_masks_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_redis_password_never_reaches_the_log(start_server) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    private = RedisServer(appendonly=False)
    try:
        private.client().config_set("requirepass", password)
        url = f"redis://:{password}@127.0.0.1:{private.port}/0"
        server = start_server(redis_url=url)
        predict(server.stub, f"secret-{uuid.uuid4().hex[:6]}", np.ones((2, 1), np.float32), start_offset=0)
        private.kill()  # Redis errors are logged and answered too: none may carry the password
        with pytest.raises(grpc.RpcError):
            predict(server.stub, "after-redis-died", np.ones((2, 1), np.float32), timeout=10)
        server.stop()
        log = server.log()
        assert "serving" in log and ":***@" in log
        assert password not in log
    finally:
        private.kill()
    # The launcher's messages, when nothing answers at the URL, redact it too.
    unreachable = f"redis://user:{password}@127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-m", "server", "--redis-url", unreachable, "--redis-autostart", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "user:***@" in done.stderr
    assert password not in done.stdout + done.stderr
