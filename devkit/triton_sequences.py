"""Run sequences through a server's Triton protocol with the real tritonclient, in a process of its own.

tritonclient's generated `inference.*` messages and the server's own (`lstm_stream.triton`) share names,
so one process can hold only one of them; tests that may share a process with the server's messages
drive tritonclient through this script: `python -m devkit.triton_sequences ADDRESS COUNT SEED` prints
one JSON object, sequence id -> {"x": inputs [T, 1], "y": the concatenated outputs [T, 1]}.
"""

from __future__ import annotations

import itertools
import json
import sys
import uuid

import numpy as np
import tritonclient.grpc as triton


def run(address: str, count: int, seed: int) -> dict[str, dict[str, list]]:
    rng = np.random.default_rng(seed)
    done = {}
    with triton.InferenceServerClient(url=address) as client:
        for n in range(count):
            length = int(rng.integers(2, 120))
            x = rng.normal(0, 1.5, size=(length, 1)).astype(np.float32)
            bounds = [0, *sorted(set(rng.integers(1, length, size=3).tolist())), length]
            sequence_id = f"triton-{uuid.uuid4().hex[:6]}-{n}"
            got = []
            for number, (a, b) in enumerate(itertools.pairwise(bounds)):
                chunk = triton.InferInput("INPUT", [b - a, 1], "FP32")
                chunk.set_data_from_numpy(x[a:b])
                result = client.infer("default", [chunk], sequence_id=sequence_id, sequence_start=number == 0,
                                      sequence_end=b == length, client_timeout=30)
                got.append(result.as_numpy("OUTPUT"))
            done[sequence_id] = {"x": x.tolist(), "y": np.concatenate(got).tolist()}
    return done


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
