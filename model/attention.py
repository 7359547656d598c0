"""Multi-head attention written as the matrices it is.

For each head h (d_k = d_model / num_heads):
    Q_h = X W_q[h],  K_h = Y W_k[h],  V_h = Y W_v[h]           projections
    S_h = Q_h K_h^T / sqrt(d_k)                                 scores [Tq, Tk]
    S_h = where(mask, S_h, -large)                              masking
    A_h = softmax(S_h) (rows sum to 1, computed in float32)     attention weights
    O_h = A_h V_h                                               weighted sum of values
    out = concat(O_1 .. O_H) W_o                                heads concatenated, projected
X = Y gives self-attention; Y = the encoder output gives cross attention.
Grouped-query attention (`num_kv_heads` = G < H; Ainslie et al. 2023): W_k and W_v
have G heads, and key/value head g serves query heads g*H/G .. (g+1)*H/G - 1 (Hugging
Face's repeat_kv order); G = 1 is multi-query attention (Shazeer 2019). Only G heads
are projected and cached, so the KV cache shrinks by H/G.
With rotary positions (rotary.py) Q and K are turned by their positions right after
the projection, before K is cached.
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
With the sequence split over the mesh's `context` axis (context.py; the mask then carries the
tokens' original `order`), K and V are all-gathered before the matrices / fused path, or the
ring (ring_attention.py) passes them round the shards instead (`mesh.context_attention`).
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

from . import context
from .dropout import Dropout
from .linear import Linear
from .masks import AttentionMask, combine_masks
from .params import EMBED_ACTIVATION, HEADS_ACTIVATION, constrain
from .ring_attention import ring_attention
from .rotary import Rotary, apply_rotary
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
    """W_q and W_o [d_model, d_model] (heads side by side), W_k and W_v [d_model, kv_heads x d_k],
    and their biases."""
    d, kv = config.d_model, config.kv_heads * config.head_dim
    return 2 * d * d + 2 * d * kv + (2 * d + 2 * kv) * int(config.use_bias)


def qkv_width(config: ModelConfig) -> int:
    """Output columns of W_q, W_k, W_v together: d_model for Q, kv_heads x d_k each for K and V."""
    return config.d_model + 2 * config.kv_heads * config.head_dim


def kv_cache_width(config: ModelConfig) -> int:
    """Numbers the KV cache holds per token and layer: K and V of kv_heads heads (GQA's saving)."""
    return 2 * config.kv_heads * config.head_dim


def repeat_kv(x: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """[B, T, G, d_k] -> [B, T, num_heads, d_k]: each key/value head copied for its group of queries."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


class MultiHeadAttention(nn.Module):
    config: ModelConfig
    deterministic: bool = True
    out_init_std: Optional[float] = None  # GPT-2 scales residual projections by 1/sqrt(2L)
    decode: bool = False  # autoregressive decoding: read and write the 'cache' collection

    @nn.compact
    def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray, mask: Mask = None,
                 rotary: Optional[Rotary] = None):
        cfg = self.config
        heads, kv_heads, d_k = cfg.num_heads, cfg.kv_heads, cfg.head_dim

        def projection(name: str, count: int) -> Linear:
            # K/V heads fewer than the query heads get their own logical name: sharding/rules.py splits them
            # over tensor only when they divide it.
            axis = "heads" if count == heads else "kv_heads"
            return Linear((cfg.d_model,), (count, d_k), ("embed", axis, "kv"), cfg.use_bias,
                          cfg.init_std, cfg.dtype, cfg.param_dtype, name=name)

        grouped = kv_heads != heads
        q = constrain(projection("query", heads)(inputs_q), HEADS_ACTIVATION)  # [B, Tq, H, d_k]
        k = projection("key", kv_heads)(inputs_kv)  # [B, Tk, G, d_k]
        v = projection("value", kv_heads)(inputs_kv)  # [B, Tk, G, d_k]
        # Grouped K/V heads are laid out as their weights are ('kv_heads': split over tensor only when
        # they divide it), and over the whole sequence like the queries: left to propagation, a
        # sequence-parallel input would hand them its sequence split instead.
        kv_names = HEADS_ACTIVATION if not grouped else (*HEADS_ACTIVATION[:2], "kv_heads", HEADS_ACTIVATION[3])
        k, v = constrain(k, kv_names), constrain(v, kv_names)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        split = isinstance(mask, AttentionMask) and mask.order is not None and not self.decode
        axis, shards = context.context_split() if split else (None, 1)
        if shards > 1 and context.attention_kind() == "ring":
            assert isinstance(mask, AttentionMask)
            values = ring_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), mask, axis, shards, cfg.dtype)
        elif cfg.attention_impl == "splash" and isinstance(mask, AttentionMask) and not self.decode:
            k, v = repeat_kv(k, heads), repeat_kv(v, heads)  # the kernel takes one K/V head per query head
            values = splash_attention(q, k, v, mask, cfg.dtype)  # the mask's structure, no [Tq, Tk] array
        else:
            if shards > 1:  # all_gather: every context shard's queries against all keys
                k, v = context.gather_keys_values(k, v, grouped)
            if isinstance(mask, AttentionMask):
                mask = mask.dense(q.shape[1], k.shape[1])
            if self.decode:
                k, v, mask = self._cached_keys_values(k, v, mask)  # the cache holds the G heads only
            if cfg.attention_impl in ("fused", "splash"):  # splash here: decoding against the cache
                values = fused_attention(q, k, v, mask, cfg.dtype)  # jax groups the query heads itself
            else:
                for name, value in (("q", q), ("k", k), ("v", v)):  # K and V: their kv_heads heads
                    self.sow("intermediates", name, value)
                scores, weights = attention_weights(q, repeat_kv(k, heads), mask)
                v = repeat_kv(v, heads)
                for name, value in (("scores", scores), ("weights", weights)):
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

        Variables (collection 'cache'): cached_key, cached_value [B, S, G, d_k] (G = kv_heads) and
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
