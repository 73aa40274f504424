"""`lstm-loadtest --gateways`: sensors forwarded many per message, verified against Keras as the load runs,
on a healthy server and through connections severed under messages in flight (invariants 1, 4 and 11,
docs/invariants.md): every chunk is applied once, its answer reaches its sensor once, and every stream
equals Keras.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from devkit.processes import ServerProcess, wait_until
from devkit.tcp_proxy import TcpProxy
from loadtest import EXIT_OK, LoadConfig, run_load
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(("api", "processes"), [("unary", 1), ("stream", 2)], ids=["predict-batch", "batch-stream"])
def test_gateway_loads_verify(default_server: ServerProcess, api: str, processes: int) -> None:
    config = LoadConfig(target=default_server.address, streams=24, chunk_timesteps=5, api=api, gateways=4,
                        processes=processes, duration_s=2.0, warmup_s=0.3, verify=True, model_path=str(DEFAULT_MODEL))
    report = run_load(config)
    assert report["exit_code"] == EXIT_OK, report["verify"]
    assert report["verify"]["passed"] and report["verify"]["streams"] == 24
    assert report["verify"]["rows_compared"] == report["totals"]["timesteps"]
    assert not report["errors"] and not report["broken_streams"]
    gateways = report["gateways"]
    # 24 sensors over 4 gateways in a closed loop: each message carries about a gateway's 6 sensors.
    assert gateways["connections"] == 4 and gateways["chunks_per_message"] > 3, gateways


@pytest.mark.parametrize("api", ["unary", "stream"])
def test_gateway_connections_severed_with_messages_in_flight_lose_nothing(default_server: ServerProcess,
                                                                          api: str) -> None:
    """The proxy between the gateways and the server resets every connection three times mid-load: the
    messages in flight are resent by offset (applied ones answered as replays), and every stream verifies."""
    proxy = TcpProxy(default_server.port)
    prefix = f"gw-sever-{uuid.uuid4().hex[:6]}"
    config = LoadConfig(target=proxy.address, streams=16, chunk_timesteps=4, api=api, gateways=2, duration_s=4.0,
                        warmup_s=0, timeout_s=2.0, max_retries=20, stream_prefix=prefix, verify=True,
                        model_path=str(DEFAULT_MODEL))
    severed: list[int] = []

    def saboteur() -> None:
        for round_ in range(3):
            wait_until(lambda r=round_: offset(default_server, f"{prefix}-0") >= 40 * (r + 1), 60,
                       "the load to get going")
            proxy.sever()
            severed.append(round_)

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    try:
        report = run_load(config)
    finally:
        thread.join(30)
        proxy.close()
    assert len(severed) == 3, "the connections were not severed during the load"
    assert report["exit_code"] == EXIT_OK, (report["verify"], report["broken_streams"])
    assert report["verify"]["passed"] and report["verify"]["streams"] == 16
    assert report["verify"]["rows_compared"] == report["totals"]["timesteps"]  # every answer once
    assert not report["broken_streams"] and report["retries"] > 0, report["errors"]


def offset(server: ServerProcess, stream_id: str) -> int:
    return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=5).offset
