"""What the resume tests read back from a finished run directory: the saved state's
fingerprint and the final params, so bit-exact comparisons are written once."""

from __future__ import annotations

import json
import os

import numpy as np


def saved_fingerprint(workdir, step: int) -> dict:
    """The whole state's per-array fingerprint (params, optimizer, step, key) saved at `step`."""
    with open(os.path.join(workdir, "checkpoints", str(step), "integrity", "metadata")) as f:
        return json.load(f)["fingerprint"]


def final_params(workdir) -> dict:
    """The newest checkpoint's params as {name: numpy array}."""
    import jax

    from matrixmagic.train.checkpoint import load_params
    from matrixmagic.train.integrity import flat_by_name

    params, _ = load_params(str(workdir))
    return {k: np.asarray(v) for k, v in flat_by_name(jax.device_get(params)).items()}
