"""Learning-rate schedules from the papers this codebase reproduces.

Every schedule is an ``optax.Schedule``: a pure, jit-friendly function from
optax's update ``count`` to a learning rate. Step convention: optax calls the
schedule with ``count`` = number of updates already applied, so the first
update sees ``count == 0``. The warmup kinds therefore start at exactly 0 and
reach the peak at ``count == warmup_steps`` (the (warmup_steps+1)-th update);
the decaying kinds reach their final value at ``count == decay_steps``.

Kinds (``make_schedule(kind, ...)``):

* ``"cosine"`` -- GPT-3 (Brown et al. 2020, Appendix B): linear warmup from 0
  to the peak, then cosine decay "down to 10% of its value", held there
  afterwards ("training continues at 10% of the original learning rate").
  ``decay_steps`` counts from step 0, i.e. it includes the warmup, matching
  ``optax.warmup_cosine_decay_schedule``.
* ``"linear"`` -- BERT (Devlin et al. 2019, Appendix A.2): linear warmup, then
  "linear decay of the learning rate" to 0 at ``decay_steps``.
* ``"rsqrt"`` -- Transformer (Vaswani et al. 2017, Section 5.3, eq. 3):
  ``lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)`` with the paper's
  ``step`` counted from 1, so ``step = count + 1``: the first update uses the
  paper's step 1 and the peak is at ``count == warmup_steps - 1``. Given
  ``peak_learning_rate`` the curve is rescaled so that the peak equals it
  (``d_model`` then cancels out); otherwise it is the formula as published.
* ``"constant"`` -- the peak, after an optional linear warmup from 0.
"""

from __future__ import annotations

import difflib
import operator

import jax.numpy as jnp
import optax

KINDS = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(
    kind: str,
    *,
    peak_learning_rate: float | None,
    warmup_steps: int,
    decay_steps: int | None = None,
    final_ratio: float = 0.1,
    d_model: int | None = None,
) -> optax.Schedule:
    """Builds the learning-rate schedule ``kind`` (see the module docstring).

    Args:
      kind: one of ``"cosine"``, ``"linear"``, ``"rsqrt"``, ``"constant"``.
      peak_learning_rate: the largest learning rate. Required except for
        ``"rsqrt"``, where ``None`` selects the paper's unscaled formula.
      warmup_steps: length of the linear warmup (``"rsqrt"``: the paper's
        ``warmup_steps``, must be >= 1).
      decay_steps: total schedule length including warmup; required for
        ``"cosine"`` and ``"linear"``, ignored by ``"rsqrt"``/``"constant"``.
      final_ratio: ``"cosine"`` only: final lr as a fraction of the peak
        (GPT-3: 0.1).
      d_model: ``"rsqrt"`` without ``peak_learning_rate`` only.

    Raises:
      ValueError: on an unknown kind or inconsistent arguments; the message
        names the argument and how to fix it.
    """
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"kind={kind!r} is not a known schedule; use one of {KINDS}.{hint}")
    warmup_steps = _non_negative_int("warmup_steps", warmup_steps)
    if decay_steps is not None:
        decay_steps = _non_negative_int("decay_steps", decay_steps)
    if peak_learning_rate is not None and not peak_learning_rate >= 0:
        raise ValueError(
            f"peak_learning_rate={peak_learning_rate!r} must be >= 0 (or None for the "
            "published 'rsqrt' formula)."
        )
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio={final_ratio!r} must lie in [0, 1] (GPT-3 uses 0.1).")

    if kind == "rsqrt":
        return _rsqrt(peak_learning_rate, warmup_steps, d_model)
    if peak_learning_rate is None:
        raise ValueError(f"kind={kind!r} needs peak_learning_rate (a float >= 0); got None.")
    if kind == "constant":
        return _constant_with_warmup(peak_learning_rate, warmup_steps)
    decay_steps = _check_decay(kind, warmup_steps, decay_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak_learning_rate,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            end_value=final_ratio * peak_learning_rate,
        )
    return optax.join_schedules(  # "linear"
        [
            optax.linear_schedule(0.0, peak_learning_rate, warmup_steps),
            optax.linear_schedule(peak_learning_rate, 0.0, decay_steps - warmup_steps),
        ],
        boundaries=[warmup_steps],
    )


def _non_negative_int(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be an integer number of steps.") from None
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0.")
    return value


def _check_decay(kind: str, warmup_steps: int, decay_steps: int | None) -> int:
    """decay_steps, checked to be given and past the warmup."""
    if decay_steps is None:
        raise ValueError(
            f"kind={kind!r} needs decay_steps (total schedule length in steps, "
            "including warmup); got None."
        )
    if warmup_steps >= decay_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be smaller than decay_steps={decay_steps} "
            f"for kind={kind!r}: decay_steps counts from step 0 and includes the warmup, "
            "so increase decay_steps or reduce warmup_steps."
        )
    return decay_steps


def _constant_with_warmup(peak: float, warmup_steps: int) -> optax.Schedule:
    if warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        boundaries=[warmup_steps],
    )


def _rsqrt(peak: float | None, warmup_steps: int, d_model: int | None) -> optax.Schedule:
    """Vaswani et al. 2017 eq. 3, with optax's 0-based count mapped to step = count + 1."""
    if warmup_steps < 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 1 for kind='rsqrt' "
            "(eq. 3 divides by warmup_steps; the paper uses 4000)."
        )
    if peak is None:
        if d_model is None:
            raise ValueError(
                "kind='rsqrt' needs either peak_learning_rate (to scale the peak) or "
                "d_model (for the published d_model^-0.5 factor); both are None."
            )
        if operator.index(d_model) < 1:
            raise ValueError(f"d_model={d_model!r} must be a positive integer.")
        scale = float(d_model) ** -0.5
    else:
        # Peak of min(s^-0.5, s * w^-1.5) is w^-0.5 at s = w; rescale it to `peak`.
        scale = peak * float(warmup_steps) ** 0.5
    w = float(warmup_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * jnp.minimum(step**-0.5, step * w**-1.5)

    return schedule
