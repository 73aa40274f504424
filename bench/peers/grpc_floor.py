"""The floor under any answer this server gives: its Triton-protocol front end with nothing behind it.

    python -m bench.peers.grpc_floor --port 8001

grpc.aio with this server's own servicer (server/api/triton.py) and conversions, reading and checking
each request and building each response exactly as the server does, in front of a data plane that
answers every chunk at once with zeros: no interceptors, batcher, Redis, rules or model. What
perf_analyzer measures here is what grpcio, protobuf and asyncio cost per request on this machine, the
part of the server's budget no change behind the servicer can remove. `python -m bench.perf_analyzer`
runs it as the server "floor", next to this server and Triton. A benchmark instrument only: it keeps no
state, so its answers are not the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import time
from collections.abc import Sequence

import grpc
import numpy as np

from server.api.streaming import StreamWindow
from server.api.triton import add_triton_service
from server.config import DEFAULT_MODEL, ServerConfig
from server.model.runner import ModelRunner
from server.types import Chunk, ModelDescription, Prediction


class AnswerAtOnce:
    """Where the data plane stands in the server: each chunk's answer is ready when it is submitted."""

    def __init__(self, model: ModelDescription, max_chunk_timesteps: int) -> None:
        self.model = model
        self.max_chunk_timesteps = max_chunk_timesteps

    def submit(self, chunk: Chunk, time_remaining: float | None = None) -> asyncio.Future[Prediction]:
        rows = chunk.timesteps if self.model.per_timestep_outputs else 1
        now = time.monotonic_ns()
        if chunk.times is not None:  # ModelStatistics counts it as one batch of one
            chunk.times.batch_began(now)
            chunk.times.model_ran(now, now, 1)
            chunk.times.batch_finished = now
        answer: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        answer.set_result(Prediction(chunk.stream_id, np.zeros((rows, self.model.output_size), np.float32),
                                     chunk.timesteps, False, chunk.request_id))
        return answer

    def abandon(self, answers: Sequence[asyncio.Future[Prediction]]) -> None:
        pass  # every answer is already there


async def serve(port: int) -> None:
    config = ServerConfig()
    # The shipped default model's description (names, shapes), so perf_analyzer sees the same model.
    runner = ModelRunner(DEFAULT_MODEL, config.max_chunk_timesteps, xla=False, max_batch=config.max_batch,
                         numpy_max_batch_timesteps=0)
    model = runner.description
    runner.close()
    # As server/app/run.py does: TensorFlow's start-up objects out of every garbage collection.
    gc.collect()
    gc.freeze()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_triton_service(server, AnswerAtOnce(model, config.max_chunk_timesteps),  # type: ignore[arg-type]
                       StreamWindow(config.stream_window, config.stream_window_bytes),
                       max_batch_size=config.max_batch, max_queue_delay_us=config.max_delay_us,
                       sequence_idle_us=config.state_ttl_us)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
