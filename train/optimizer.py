"""AdamW with global-norm clipping, a name-based weight-decay mask, and
gradient accumulation.

Defaults follow GPT-3 (Brown et al. 2020, Appendix B): Adam with beta1=0.9,
beta2=0.95, eps=1e-8, gradient global norm clipped at 1.0, weight decay 0.1
(decoupled, as in Loshchilov & Hutter 2019, "Decoupled Weight Decay
Regularization"). optax's AdamW multiplies the decay by the learning rate, so
the decay follows the schedule: ``p <- p - lr * (adam_direction + wd * p)``.

Which parameters are decayed is decided by the leaf NAME, never by ndim:
layers stacked with ``nn.scan`` carry a leading layer axis, so a ``[L, d]``
bias is 2-D yet still a bias. See ``weight_decay_mask``.

Gradient accumulation (``accumulate_gradients``) runs microbatches through
``jax.lax.scan`` and, when the loss function reports its token weight, returns
exactly the gradient of the full-batch token-weighted mean (see its docstring
for the ``loss_fn`` contract).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

DECAYED_LEAF_NAMES = frozenset({"kernel", "embedding"})
UNDECAYED_LEAF_NAMES = frozenset({"bias", "scale"})
WEIGHT_KEY = "weight"


def weight_decay_mask(params) -> object:
    """Pytree of bools matching ``params``: True where weight decay applies.

    Decayed: ``kernel`` (every dense/attention weight, any rank, scanned or
    not) and ``embedding`` (token, learned-position and token-type tables).
    Decaying embeddings follows GPT-3/nanoGPT practice (GPT-3 Appendix B
    applies weight decay 0.1 without exempting them); it keeps the tied
    input/output table from growing without bound.
    Not decayed: ``bias`` and LayerNorm ``scale`` (shifts and gains, whose
    natural value is not 0; decaying them pulls LayerNorm towards zero output).

    Raises:
      ValueError: for a leaf with any other name, naming its path, so a new
        kind of parameter cannot silently escape the decision: add its name
        to ``DECAYED_LEAF_NAMES`` or ``UNDECAYED_LEAF_NAMES``.
    """
    return jax.tree_util.tree_map_with_path(_decay_leaf, params)


def _decay_leaf(path, leaf) -> bool:
    del leaf
    name = _leaf_name(path)
    if name in DECAYED_LEAF_NAMES:
        return True
    if name in UNDECAYED_LEAF_NAMES:
        return False
    raise ValueError(
        f"weight_decay_mask: no decay rule for parameter {jax.tree_util.keystr(path)!r} "
        f"(leaf name {name!r}). Add the name to DECAYED_LEAF_NAMES or UNDECAYED_LEAF_NAMES "
        "in train/optimizer.py; if params are still boxed (nn.Partitioned), call "
        "flax.linen.meta.unbox(params) first."
    )


def _leaf_name(path) -> str | None:
    if not path:
        return None
    last = path[-1]
    if isinstance(last, jax.tree_util.DictKey):
        return str(last.key)
    if isinstance(last, jax.tree_util.GetAttrKey):
        return last.name
    return None


def make_optimizer(
    *,
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW masked by ``weight_decay_mask``.

    Defaults are GPT-3's (Brown et al. 2020, Appendix B). ``learning_rate`` is
    a float or an ``optax.Schedule`` (see ``train.schedules.make_schedule``).
    ``clip_norm=None`` disables clipping. Works on plain nested dicts of arrays
    (Flax params after ``nn.meta.unbox``).
    """
    if not callable(learning_rate) and not learning_rate >= 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be >= 0 or an optax schedule.")
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}={beta!r} must lie in [0, 1) (GPT-3: b1=0.9, b2=0.95).")
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0 (GPT-3: 1e-8).")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0 (GPT-3: 0.1).")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm!r} must be > 0, or None to disable clipping.")
    adamw = optax.adamw(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
    )
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def split_microbatches(batch, num_microbatches: int):
    """Reshapes every ``[B, ...]`` leaf of ``batch`` to ``[k, B // k, ...]``.

    Microbatch ``i`` takes rows ``i, i + k, i + 2k, ...`` (strided, via a
    ``[B//k, k]`` reshape and a transpose) rather than a contiguous block, so
    when the batch axis is sharded over data-parallel devices every device
    holds an equal share of every microbatch and no resharding is needed.
    """
    k = _check_num_microbatches(num_microbatches)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("accumulate_gradients: batch has no arrays to split.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every array in batch needs the same leading batch dimension; got {sorted(map(str, sizes))}."
        )
    (size,) = sizes
    assert size is not None  # refused above
    if size % k:
        raise ValueError(
            f"batch size {size} is not divisible by num_microbatches={k}; choose a "
            f"num_microbatches that divides it (or a batch size that is a multiple of {k})."
        )

    def split(x):
        x = jnp.reshape(x, (size // k, k) + jnp.shape(x)[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def _check_num_microbatches(num_microbatches) -> int:
    try:
        k = operator.index(num_microbatches)
    except TypeError:
        raise TypeError(f"num_microbatches={num_microbatches!r} must be an int >= 1.") from None
    if k < 1:
        raise ValueError(f"num_microbatches={k} must be >= 1 (1 disables accumulation).")
    return k


def accumulate_gradients(
    loss_fn: Callable,
    params,
    batch: Mapping,
    num_microbatches: int,
    rng: jax.Array | None = None,
    active: jax.Array | None = None,
):
    """Mean loss and gradient of ``loss_fn`` over ``batch`` in microbatches.

    Contract for ``loss_fn(params, microbatch, rng) -> (loss, aux)``:

    * ``loss``: scalar MEAN over the microbatch's (weighted) tokens.
    * ``aux``: dict of scalars. Optionally ``aux["weight"]``: the denominator
      of that mean, e.g. ``loss_mask.sum()`` -- exactly the number the loss was
      divided by (guard an all-masked microbatch in the loss itself, e.g.
      ``sum / max(weight, 1)``; a zero-weight microbatch then contributes 0).
    * ``rng``: a per-microbatch key split from ``rng`` (or ``None``).

    With ``"weight"``, microbatches are combined by their sum form
    ``weight_i * loss_i``: ``loss = sum_i w_i L_i / sum_i w_i`` and the same
    for the gradient, which equals the full-batch token-weighted mean exactly,
    even when microbatches hold different numbers of tokens (weights are
    treated as constants: ``stop_gradient``). Every other aux entry is averaged
    with the same weights and the returned ``aux["weight"]`` is the total.
    Without ``"weight"`` all microbatches count equally, which is exact only if
    each has the same denominator (e.g. no loss mask).

    Gradients are accumulated in float32 and cast back to each param's dtype.
    ``num_microbatches=1`` is a plain ``jax.value_and_grad`` call (no scan,
    ``rng`` passed through unsplit).

    ``active``: optional ``[num_microbatches]`` bools (the batch ramp, train/ramp.py). A
    microbatch marked False is not computed at all (``lax.cond``) and counts as weight 0,
    so it must hold no weighted token. ``None`` builds the plain scan, without a cond.
    With one microbatch it is ignored: that microbatch holds the active rows.

    Returns:
      ``(mean_loss, mean_grads, aux)``.
    """
    k = _check_num_microbatches(num_microbatches)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, grads, aux

    micro = split_microbatches(batch, k)
    rngs = None if rng is None else jax.random.split(rng, k)
    first = jax.tree_util.tree_map(lambda x: x[0], micro)
    _, aux_shape = jax.eval_shape(loss_fn, params, first, None if rngs is None else rngs[0])
    if not isinstance(aux_shape, Mapping):
        raise TypeError(f"loss_fn must return (loss, aux) with aux a dict; got {type(aux_shape)}.")
    weighted = WEIGHT_KEY in aux_shape
    f32_zeros = lambda t: jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), t)

    def body(carry, xs):
        microbatch, key, run = xs
        if run is None:
            (loss, aux), grads = grad_fn(params, microbatch, key)
        else:  # an inactive microbatch (all padding) is skipped, not computed and masked
            shapes = jax.eval_shape(grad_fn, params, microbatch, key)
            skipped = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (loss, aux), grads = jax.lax.cond(run, lambda: grad_fn(params, microbatch, key), lambda: skipped)
        aux = dict(aux)
        w = jax.lax.stop_gradient(jnp.asarray(aux.pop(WEIGHT_KEY), jnp.float32)) if weighted else 1.0
        scaled = lambda x: jnp.where(w > 0, jnp.asarray(x, jnp.float32) * w, 0.0)
        total_w, loss_sum, grad_sum, aux_sum = carry
        add = lambda acc, x: acc + scaled(x)
        return (
            total_w + w,
            add(loss_sum, loss),
            jax.tree_util.tree_map(add, grad_sum, grads),
            jax.tree_util.tree_map(add, aux_sum, aux),
        ), None

    aux_rest = {key: v for key, v in aux_shape.items() if key != WEIGHT_KEY}
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), f32_zeros(params), f32_zeros(aux_rest))
    (total_w, loss_sum, grad_sum, aux_sum), _ = jax.lax.scan(body, init, (micro, rngs, active))

    safe_w = jnp.where(total_w > 0, total_w, 1.0)
    mean = lambda x: jnp.where(total_w > 0, x / safe_w, 0.0)
    grads = jax.tree_util.tree_map(lambda g, p: mean(g).astype(jnp.result_type(p)), grad_sum, params)
    aux = jax.tree_util.tree_map(mean, aux_sum)
    if weighted:
        aux[WEIGHT_KEY] = total_w
    return mean(loss_sum), grads, aux
