"""TrainState: the whole of a run's state as one pytree.

The PRNG key lives in the state (as in Levanter), and the per-step dropout key
is fold_in(key, step), so a resumed run draws exactly the same randomness.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import linen as nn
from flax import struct

from matrixmagic.model import build


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(model_config, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Pure function: init params and optimizer state. Jit it with out_shardings to init sharded."""
    init_rng, state_rng = jax.random.split(rng)
    params = nn.meta.unbox(build.init_variables(model_config, init_rng)["params"])
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)
