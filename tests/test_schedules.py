"""Schedules against closed-form values from the papers (computed in numpy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matrixmagic.train.schedules import make_schedule

PEAK = 6e-4
WARMUP = 100
DECAY = 1000


def _at(schedule, step):
    return float(schedule(jnp.asarray(step, jnp.int32)))


def test_cosine_matches_gpt3_closed_form():
    s = make_schedule("cosine", peak_learning_rate=PEAK, warmup_steps=WARMUP, decay_steps=DECAY)
    assert _at(s, 0) == 0.0
    np.testing.assert_allclose(_at(s, WARMUP // 2), PEAK / 2, rtol=1e-6)
    np.testing.assert_allclose(_at(s, WARMUP), PEAK, rtol=1e-6)
    for step in (DECAY, DECAY + 1, 5 * DECAY):
        np.testing.assert_allclose(_at(s, step), 0.1 * PEAK, rtol=1e-6)
    for step in (WARMUP + 1, 300, (WARMUP + DECAY) // 2, 999):
        progress = (step - WARMUP) / (DECAY - WARMUP)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        expected = 0.1 * PEAK + (PEAK - 0.1 * PEAK) * cosine
        np.testing.assert_allclose(_at(s, step), expected, rtol=1e-5)
    # Midpoint of the decay phase is exactly halfway between peak and floor.
    np.testing.assert_allclose(_at(s, (WARMUP + DECAY) // 2), 0.55 * PEAK, rtol=1e-5)


def test_cosine_final_ratio_and_no_warmup():
    s = make_schedule(
        "cosine", peak_learning_rate=1.0, warmup_steps=0, decay_steps=10, final_ratio=0.0
    )
    np.testing.assert_allclose(_at(s, 0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(_at(s, 10), 0.0, atol=1e-7)


def test_linear_matches_bert():
    s = make_schedule("linear", peak_learning_rate=1e-4, warmup_steps=10_000, decay_steps=1_000_000)
    for step, expected in [
        (0, 0.0),
        (2_500, 0.25e-4),
        (10_000, 1e-4),
        (505_000, 0.5e-4),
        (1_000_000, 0.0),
        (2_000_000, 0.0),
    ]:
        np.testing.assert_allclose(_at(s, step), expected, rtol=1e-5, atol=1e-12)


def _vaswani(step_from_one, d_model, warmup):
    return d_model**-0.5 * min(step_from_one**-0.5, step_from_one * warmup**-1.5)


def test_rsqrt_as_published():
    s = make_schedule("rsqrt", peak_learning_rate=None, warmup_steps=4000, decay_steps=None, d_model=512)
    for count in (0, 1, 999, 3998, 3999, 4000, 10_000, 99_999):
        np.testing.assert_allclose(_at(s, count), _vaswani(count + 1, 512, 4000), rtol=1e-5)
    # Peak at the paper's step == warmup, i.e. optax count warmup - 1.
    assert _at(s, 3999) > _at(s, 3998) and _at(s, 3999) > _at(s, 4000)


def test_rsqrt_scaled_to_peak():
    s = make_schedule("rsqrt", peak_learning_rate=1e-3, warmup_steps=100, decay_steps=None, d_model=512)
    np.testing.assert_allclose(_at(s, 99), 1e-3, rtol=1e-6)
    for count in (0, 49, 199, 9_999):
        ratio = _vaswani(count + 1, 512, 100) / _vaswani(100, 512, 100)
        np.testing.assert_allclose(_at(s, count), 1e-3 * ratio, rtol=1e-5)


@pytest.mark.parametrize("warmup", [0, 10])
def test_constant(warmup):
    s = make_schedule("constant", peak_learning_rate=3e-4, warmup_steps=warmup)
    if warmup:
        np.testing.assert_allclose(_at(s, 0), 0.0)
        np.testing.assert_allclose(_at(s, 5), 1.5e-4, rtol=1e-6)
    for step in (warmup, warmup + 1, 10**6):
        np.testing.assert_allclose(_at(s, step), 3e-4, rtol=1e-6)


def test_schedule_is_jittable():
    s = make_schedule("cosine", peak_learning_rate=PEAK, warmup_steps=WARMUP, decay_steps=DECAY)
    np.testing.assert_allclose(float(jax.jit(s)(jnp.int32(WARMUP))), PEAK, rtol=1e-6)


@pytest.mark.parametrize(
    "kind, kwargs, match",
    [
        ("cosin", dict(peak_learning_rate=1.0, warmup_steps=1, decay_steps=2), r"kind=.*'cosine'"),
        ("cosine", dict(peak_learning_rate=1.0, warmup_steps=20, decay_steps=10), r"warmup_steps=20.*decay_steps=10"),
        ("linear", dict(peak_learning_rate=1.0, warmup_steps=10, decay_steps=10), r"warmup_steps.*decay_steps"),
        ("cosine", dict(peak_learning_rate=1.0, warmup_steps=1, decay_steps=None), r"decay_steps"),
        ("cosine", dict(peak_learning_rate=-1.0, warmup_steps=1, decay_steps=2), r"peak_learning_rate"),
        ("constant", dict(peak_learning_rate=1.0, warmup_steps=-1), r"warmup_steps=-1"),
        ("cosine", dict(peak_learning_rate=1.0, warmup_steps=1, decay_steps=-5), r"decay_steps=-5"),
        ("cosine", dict(peak_learning_rate=1.0, warmup_steps=1, decay_steps=5, final_ratio=1.5), r"final_ratio"),
        ("rsqrt", dict(peak_learning_rate=None, warmup_steps=4000), r"peak_learning_rate.*d_model"),
        ("rsqrt", dict(peak_learning_rate=1.0, warmup_steps=0), r"warmup_steps=0"),
        ("linear", dict(peak_learning_rate=None, warmup_steps=1, decay_steps=2), r"peak_learning_rate"),
    ],
)
def test_bad_arguments_name_the_argument(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(kind, **kwargs)
