"""`attention_impl="splash"`: jax's Pallas splash-attention kernel for TPU.

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention) is a flash-style
kernel: it walks Q and K/V in blocks with a running softmax, so the [Tq, Tk] scores
and weights never exist in HBM, and blocks the static mask hides (the upper triangle
of a causal mask) are skipped. It takes the mask as structure, not as an array: a
static Causal or Full mask per head, and the segment ids of queries and keys
(masks.AttentionMask.kernel_segments), equal ids attending each other.

Here, for q [B, Tq, H, d_k] and k, v [B, Tk, H, d_k]:
- Q is scaled by 1/sqrt(d_k) first (the kernel computes Q K^T unscaled);
- the kernel works on one sequence, [H, T, d_k], so it is vmapped over the batch;
- blocks: the largest of 512, 256, 128 that divides each length (512 as MaxText's
  default); a length that 128 does not divide is an error (configs checks the run's
  lengths first: SPLASH_BLOCK);
- under a mesh (GSPMD), a Pallas call is not partitioned automatically: it runs in
  `jax.shard_map` over the mesh in context, batch and heads split as the logical
  rules in context split 'activation_batch' and 'activation_heads', lengths whole.
  Each device builds the kernel for its own heads. Without a mesh it is called directly.
  model/ never names a mesh: sharding/partition.py's `with_rules` supplies both.

Pallas TPU kernels also run in Pallas's interpreter on any backend: `interpreted()` is
the test hook that does so (tests compare splash with the matrices on CPU); runs never
interpret. Attention dropout is impossible (no weights are formed), as for `fused`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from matrixmagic.configs.model_config import SPLASH_BLOCK

from .masks import AttentionMask

BLOCKS = (512, 256, 128)  # tried largest first; each a multiple of SPLASH_BLOCK (TPU lanes)
assert all(b % SPLASH_BLOCK == 0 for b in BLOCKS)

# Test hook: None in runs; in `interpreted()`, the largest block to use.
_INTERPRET: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("splash_interpret", default=None)


@contextlib.contextmanager
def interpreted(largest_block: int = BLOCKS[0]):
    """Run the kernel in Pallas's interpreter (any backend, CPU included), with blocks of at most
    `largest_block`, for functions traced inside the block. A test hook, not a setting: the
    interpreter is slow and exists to check the kernel's numbers off TPU. jit caches traces, so
    trace the function under test inside it."""
    token = _INTERPRET.set(largest_block)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def block_size(length: int, largest: int = BLOCKS[0]) -> int:
    """The largest block of BLOCKS (at most `largest`) that divides `length`."""
    for block in BLOCKS:
        if block <= largest and length % block == 0:
            return block
    raise ValueError(f"model.attention_impl='splash' tiles attention in blocks of {SPLASH_BLOCK}, and an attention "
                     f"length of {length} is not a multiple of {SPLASH_BLOCK}: use sequence lengths that are, or "
                     f"model.attention_impl=matrices or fused.")


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, largest: int, interpret: bool):
    """A splash kernel for [heads, q_len, d] x [heads, kv_len, d], forward and backward blocks alike."""
    bq, bkv = block_size(q_len, largest), block_size(kv_len, largest)
    blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                   block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    shape = (q_len, kv_len)
    head_mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=blocks,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_attention(q, k, v, *segments, causal: bool, largest: int, interpret: bool):
    """The kernel on the arrays one device holds: q [b, h, Tq, d], k and v [b, h, Tk, d]."""
    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], causal, largest, interpret)
    ids = kernel_lib.SegmentIds(*segments) if segments else None
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=s1))(q, k, v, ids)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask,
                     dtype) -> jnp.ndarray:
    """softmax(Q K^T / sqrt(d_k), masked) V by the splash kernel: q [B, Tq, H, d_k], k and v
    [B, Tk, H, d_k] -> [B, Tq, H, d_k] in `dtype`. Padding queries (segment 0) attend the padding
    keys, unlike the dense paths (masks.AttentionMask.kernel_segments): only their outputs differ."""
    batch, q_len, _, d_k = q.shape
    ids = mask.kernel_segments(batch, q_len, k.shape[1])
    segments = () if ids is None else ids  # no segment ids: the kernel takes none
    q = (q.astype(jnp.float32) / math.sqrt(d_k)).astype(dtype)
    q, k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, d_k]: the kernel's layout
    largest = _INTERPRET.get()
    local = functools.partial(_local_attention, causal=mask.causal, largest=largest or BLOCKS[0],
                              interpret=largest is not None)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q, k, v, *segments)
    else:
        # Batch and heads split as the rules split the activations (length and d_k whole).
        heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads", None, None))
        assert heads is not None  # None only when the names passed are None
        rows = P(heads[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(heads,) * 3 + (rows,) * len(segments), out_specs=heads,
                            check_vma=False)(q, k, v, *segments)
    return out.transpose(0, 2, 1, 3)
