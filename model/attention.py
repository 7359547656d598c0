"""Multi-head attention written as the matrices it is.

For each head h (d_k = d_model / num_heads):
    Q_h = X W_q[h],  K_h = Y W_k[h],  V_h = Y W_v[h]           projections
    S_h = Q_h K_h^T / sqrt(d_k)                                 scores [Tq, Tk]
    S_h = where(mask, S_h, -large)                              masking
    A_h = softmax(S_h) (rows sum to 1, computed in float32)     attention weights
    O_h = A_h V_h                                               weighted sum of values
    out = concat(O_1 .. O_H) W_o                                heads concatenated, projected
X = Y gives self-attention; Y = the encoder output gives cross attention.
The mask arrives as structure (masks.AttentionMask: causal, segment ids) or, from the
KV cache and hand-built callers, as a dense boolean array.
`config.attention_impl` chooses how:
- "matrices" computes exactly the lines above, each matrix an array, from the mask's
  dense form: the reference, and what `magic explain` walks;
- "fused" hands Q, K, V and the dense mask to jax.nn.dot_product_attention, the entry
  point of jax's attention kernels. In jax 0.10 its default implementation runs the same
  XLA computation (no speed-up: benchmarks/bench_train_step.py);
- "splash" runs the Pallas splash-attention kernel on TPU (splash.py): flash-style
  blocks with a running softmax, so the [Tq, Tk] matrices never reach HBM, fed the
  mask's structure. It needs lengths that are multiples of 128; KV-cache decoding
  (one new query row against the cache, dense mask) runs the fused path instead.
fused and splash never return the weights: no attention dropout, nothing to sow.
With `decode=True` (self-attention only) K and V are also written to a KV cache
(see `_cached_keys_values`), so generation computes one new row per step.
Each intermediate is `sow`n under 'intermediates' so `magic explain` can show
the real matrices of a forward pass.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from matrixmagic.configs import ModelConfig

from .dropout import Dropout
from .linear import Linear
from .masks import AttentionMask, combine_masks
from .params import EMBED_ACTIVATION, HEADS_ACTIVATION, constrain
from .splash import splash_attention

Mask = Optional[Union[AttentionMask, jnp.ndarray]]  # structure, or a dense [B or 1, 1, Tq, Tk] boolean array

# Large but finite, so a fully masked row gives a uniform softmax rather than NaN.
MASK_VALUE = -1e9


def attention_weights(q: jnp.ndarray, k: jnp.ndarray, mask: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """q [B, Tq, H, d_k], k [B, Tk, H, d_k] -> (scores, softmax weights), both [B, H, Tq, Tk] float32."""
    d_k = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d_k)
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    return scores, jax.nn.softmax(scores, axis=-1)


def fused_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Optional[jnp.ndarray],
                    dtype) -> jnp.ndarray:
    """softmax(Q K^T / sqrt(d_k), masked) V in one call: q [B, Tq, H, d_k], k and v [B, Tk, H, d_k],
    mask [B or 1, 1, Tq, Tk] -> [B, Tq, H, d_k]. A fully masked row attends uniformly, as in
    `attention_weights`, so padding rows match the matrices path."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def attention_params(config: ModelConfig) -> int:
    """W_q, W_k, W_v, W_o, each [d_model, d_model] (heads side by side), and their biases."""
    d = config.d_model
    return 4 * d * d + 4 * d * int(config.use_bias)


class MultiHeadAttention(nn.Module):
    config: ModelConfig
    deterministic: bool = True
    out_init_std: Optional[float] = None  # GPT-2 scales residual projections by 1/sqrt(2L)
    decode: bool = False  # autoregressive decoding: read and write the 'cache' collection

    @nn.compact
    def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray, mask: Mask = None):
        cfg = self.config
        heads, d_k = cfg.num_heads, cfg.head_dim

        def projection(name: str) -> Linear:
            return Linear((cfg.d_model,), (heads, d_k), ("embed", "heads", "kv"), cfg.use_bias,
                          cfg.init_std, cfg.dtype, cfg.param_dtype, name=name)

        q = constrain(projection("query")(inputs_q), HEADS_ACTIVATION)  # [B, Tq, H, d_k]
        k = constrain(projection("key")(inputs_kv), HEADS_ACTIVATION)  # [B, Tk, H, d_k]
        v = constrain(projection("value")(inputs_kv), HEADS_ACTIVATION)  # [B, Tk, H, d_k]
        if cfg.attention_impl == "splash" and isinstance(mask, AttentionMask) and not self.decode:
            values = splash_attention(q, k, v, mask, cfg.dtype)  # the mask's structure, no [Tq, Tk] array
        else:
            if isinstance(mask, AttentionMask):
                mask = mask.dense(q.shape[1], k.shape[1])
            if self.decode:
                k, v, mask = self._cached_keys_values(k, v, mask)
            if cfg.attention_impl in ("fused", "splash"):  # splash here: decoding against the cache
                values = fused_attention(q, k, v, mask, cfg.dtype)
            else:
                scores, weights = attention_weights(q, k, mask)
                for name, value in (("q", q), ("k", k), ("v", v), ("scores", scores), ("weights", weights)):
                    self.sow("intermediates", name, value)
                weights = Dropout(cfg.attention_dropout_rate, self.deterministic)(weights)
                values = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(cfg.dtype), v.astype(cfg.dtype))
        concatenated = values.reshape(values.shape[:2] + (heads * d_k,))  # [B, Tq, d_model]
        self.sow("intermediates", "heads_concatenated", concatenated)
        # W_o takes `values` [B, Tq, H, d_k], not the flat concat: with H = 1 and Tq = 1 the flat
        # [B, 1, d_model] also matches the kernel's (H, d_k) trailing dims and would lose the Tq axis.
        out = Linear((heads, d_k), (cfg.d_model,), ("heads", "kv", "embed"), cfg.use_bias,
                     self.out_init_std or cfg.init_std, cfg.dtype, cfg.param_dtype, name="output")(values)
        out = constrain(out, EMBED_ACTIVATION)  # heads summed: the all-reduce over tensor
        self.sow("intermediates", "output_projection", out)
        return out

    def _cached_keys_values(self, k: jnp.ndarray, v: jnp.ndarray, mask: Optional[jnp.ndarray]
                            ) -> tuple[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]]:
        """KV cache for decoding: write this call's K, V rows, attend over the whole cache.

        Variables (collection 'cache'): cached_key, cached_value [B, S, H, d_k] and
        cache_index [B], the number of filled slots per row. The cache length S is the
        sequence length `init` was called with (generate.init_cache: max_len by default).
        Each row writes its T new rows at slots cache_index[b] .. cache_index[b] + T - 1,
        so a row's slot is its position when positions start at 0 (the caller keeps them
        in step, and resets cache_index after a padded prefill). Query t of row b sees
        slots <= cache_index[b] + t only: causal, and never an unfilled slot. Writes past
        S are clamped by XLA, so the caller must keep prompt + new tokens <= S.
        At init the cache is created empty and plain attention runs on the inputs.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros(k.shape[:1], jnp.int32))
        if not initialized:
            return k, v, mask
        index, length, slots = cache_index.value, k.shape[1], cached_key.value.shape[1]

        def write(cache, new):  # per row: cache[b, index[b]:index[b]+T] = new[b]
            return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (i, 0, 0)))(
                cache, new, index)

        cached_key.value = write(cached_key.value, k)
        cached_value.value = write(cached_value.value, v)
        cache_index.value = index + length
        query_slots = index[:, None] + jnp.arange(length)  # [B, T]
        visible = jnp.arange(slots)[None, None, :] <= query_slots[:, :, None]  # [B, T, S]
        return cached_key.value, cached_value.value, combine_masks(mask, visible[:, None])
