"""Dropout: zero each activation with probability `rate` while training.

Kept units are scaled by 1 / (1 - rate) so the expected activation is the same
in training and inference; with `deterministic=True` (evaluation, generation)
it is the identity. Randomness comes from the 'dropout' rng stream.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn


class Dropout(nn.Module):
    rate: float
    deterministic: Optional[bool] = None  # set here or per call

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: Optional[bool] = None) -> jnp.ndarray:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
