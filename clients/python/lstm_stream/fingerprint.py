"""The model fingerprint (`ModelInfo.fingerprint`, recorded in every saved slot): how it is computed.

A digest of the model's architecture (its Keras config) and every weight (path, shape, float32 bytes).
The server computes it for the model it loads; the load tester's --verify computes it for a local model
file to tell whether that file is the server's model. One definition, here, where both can import it:
the client distribution, which imports neither Keras nor the server (the model is passed in, duck-typed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def fingerprint(model: Any) -> str:
    """16 hex digits for a Keras model (anything with `get_config()` and `weights` of `.path` / `.numpy()`)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
        digest.update(weight.path.encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]
