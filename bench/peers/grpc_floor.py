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
from server.api.triton import TritonServicer, add_triton_service
from server.config import DEFAULT_MODEL, ServerConfig
from server.dataplane.plane import MODEL_ALIAS, ServedModel
from server.dataplane.versions import ModelVersions, VersionStatus
from server.errors import model_not_found
from server.model.runner import ModelRunner
from server.types import Chunk, Prediction, Runner


class AnswerAtOnce:
    """Where the data plane stands in the server: each chunk's answer is ready when it is submitted. It serves
    the server's model as the server's `--model FILE` does: one model, version 1, under its name or "default"."""

    def __init__(self, runner: Runner, max_chunk_timesteps: int) -> None:
        self.model = model = runner.description
        self.max_chunk_timesteps = max_chunk_timesteps
        self.control = None  # no repository
        versions = ModelVersions.of(runner, 1, model.name)
        # Only what the Triton servicer reads of a served model: no store, processor or batcher behind it.
        self._served = ServedModel(model.name, versions, None, None, None,  # type: ignore[arg-type]
                                   model.input_features, model.output_size, model.per_timestep_outputs)

    def served(self, name: str = "") -> ServedModel:
        if name not in ("", MODEL_ALIAS, self.model.name):
            raise model_not_found(name, [self.model.name])
        return self._served

    def model_names(self) -> list[str]:
        return [self.model.name]

    def version_status(self) -> list[VersionStatus]:
        return self._served.versions.status()

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
    runner.close()  # its description and zero state are all the floor reads
    # As server/app/run.py does: TensorFlow's start-up objects out of every garbage collection.
    gc.collect()
    gc.freeze()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = TritonServicer(AnswerAtOnce(runner, config.max_chunk_timesteps),  # type: ignore[arg-type]
                              StreamWindow(config.stream_window, config.stream_window_bytes),
                              max_batch_size=config.max_batch, max_queue_delay_us=config.max_delay_us,
                              sequence_idle_us=config.state_ttl_us)
    add_triton_service(server, servicer)
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
