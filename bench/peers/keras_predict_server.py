"""The per-request `model.predict` peer: a small, honest stateful-LSTM server, written the way the
Keras answer leads a user to write one.

For every chunk: load the stream's state from Redis, set it into a `stateful=True` model with batch
size 1 (`layer.states[i].assign`), call `model.predict`, read the states back, save them to Redis.
One model, so one chunk at a time. It speaks the native API (Predict and PredictStream) so the same
load-test tool drives it; it keeps no offsets or retry records (it has no exactly-once).

Run: python -m bench.peers.keras_predict_server --port 50071 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import keras
import numpy as np
import redis.asyncio as aioredis

from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.config import DEFAULT_MODEL


def stateful_copy(model: keras.Model) -> keras.Model:
    """The same layers and weights, every recurrent layer stateful, batch size 1."""
    features = model.input_shape[-1]
    layers = [keras.Input(batch_shape=(1, None, features))]
    for layer in model.layers:
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config["stateful"] = True
        layers.append(type(layer).from_config(config))
    copy = keras.Sequential(layers)
    copy.set_weights(model.get_weights())
    return copy


class PredictPerRequest(pb_grpc.StreamInferenceServicer):
    def __init__(self, model_path: str, redis_url: str) -> None:
        self.model = stateful_copy(keras.models.load_model(model_path, compile=False))
        self.features = self.model.input_shape[-1]
        self.variables = [v for layer in self.model.layers if getattr(layer, "stateful", False) for v in layer.states]
        self.redis = aioredis.Redis.from_url(redis_url)
        self.lock = asyncio.Lock()

    def _step(self, x: np.ndarray, saved: bytes | None) -> tuple[np.ndarray, bytes]:
        if saved is None:
            for variable in self.variables:
                variable.assign(np.zeros(variable.shape, np.float32))
        else:
            flat = np.frombuffer(saved, np.float32)
            start = 0
            for variable in self.variables:
                size = int(np.prod(variable.shape))
                variable.assign(flat[start : start + size].reshape(variable.shape))
                start += size
        y = self.model.predict(x[None], verbose=0)[0]
        state = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in self.variables])
        return y.reshape(y.shape[0] if y.ndim == 2 else 1, -1), state.tobytes()

    async def _answer(self, request: pb.PredictRequest) -> pb.PredictResponse:
        x = np.asarray(request.values, np.float32).reshape(request.timesteps, self.features)
        key = f"peer:{{{request.stream_id}}}"
        async with self.lock:  # one model, one chunk at a time
            saved = None if request.reset else await self.redis.get(key)
            offset = 0 if saved is None else int(await self.redis.get(key + ":offset") or 0)
            y, state = await asyncio.to_thread(self._step, x, saved)
            offset += request.timesteps
            await self.redis.set(key, state)
            await self.redis.set(key + ":offset", offset)
        return pb.PredictResponse(stream_id=request.stream_id, outputs=y.ravel(), timesteps=y.shape[0],
                                  output_size=y.shape[1], offset=offset, request_id=request.request_id)

    async def Predict(self, request, context):
        return await self._answer(request)

    async def PredictStream(self, requests, context):
        async for request in requests:
            yield await self._answer(request)

    async def GetModel(self, request, context):
        return pb.ModelInfo(name="predict-per-request", input_features=self.features,
                            output_size=int(self.model.output_shape[-1]), max_chunk_timesteps=1024,
                            per_timestep_outputs=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    server = grpc.aio.server()
    pb_grpc.add_StreamInferenceServicer_to_server(PredictPerRequest(args.model, args.redis_url), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"predict-per-request peer serving on 127.0.0.1:{args.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
