"""Model repositories on disk for tests, benchmarks and scripts (`lstm-serve --model-repository DIR`).

The layout is docs/models.md's: DIR/<model>/<version>/model.keras.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def install(repository: Path, model: str, version: int, model_file: Path) -> Path:
    """Copy a model in as a deployment tool should: written elsewhere, then renamed into place in one step
    (so a server polling the folder never sees it half-written). Returns the version's folder."""
    staging = repository.parent / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    shutil.copy(model_file, staging / "model.keras")
    (repository / model).mkdir(parents=True, exist_ok=True)
    os.rename(staging, repository / model / str(version))
    return repository / model / str(version)
