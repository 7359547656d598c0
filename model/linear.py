"""Linear: y = x W + b, the matrix product every sublayer is built from.

The kernel may have several input and output dimensions (e.g. [embed, heads, kv]
for a query projection) so each dimension gets its own logical axis name; the
product itself is one 2-D matmul over the flattened dimensions.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import linen as nn

from .params import logical_param, normal


class Linear(nn.Module):
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]  # one name per dim of in_shape + out_shape
    use_bias: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        kernel = logical_param(self, "kernel", normal(self.init_std), self.in_shape + self.out_shape,
                               self.kernel_axes, self.param_dtype)
        k = len(self.in_shape)
        if x.shape[-k:] == tuple(self.in_shape):
            batch_dims = x.shape[:-k]
        elif x.shape[-1] == n_in:  # already flattened, e.g. heads concatenated
            batch_dims = x.shape[:-1]
        else:
            raise ValueError(f"Linear expects trailing dims {self.in_shape} or {n_in}, got {x.shape}")
        x2 = x.reshape(batch_dims + (n_in,)).astype(self.dtype)
        y = x2 @ kernel.reshape(n_in, n_out).astype(self.dtype)
        if self.use_bias:
            bias_axes = self.kernel_axes[len(self.in_shape):]
            bias = logical_param(self, "bias", nn.initializers.zeros, self.out_shape, bias_axes, self.param_dtype)
            y = y + bias.reshape(n_out).astype(self.dtype)
        return y.reshape(batch_dims + self.out_shape)
