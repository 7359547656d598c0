"""Pipeline parallelism (issue 27; model/stages.py, configs/pipeline.py): on 8 fake CPU devices
a stage=2 run (plain, circular, with fsdp=2, and with context=2 and fsdp=2) trains like one
device, its checkpoint restores bit-exactly onto stage=1 and fsdp=8, and bad pipelines fail
naming the field. (tests/test_pipeline.py is
the data pipeline.)

The 8-device checks run this file as a script in a subprocess with
`--xla_force_host_platform_device_count=8`, as tests/test_sharding.py does. Dropout is 0: the
pipeline draws its masks per (step, stage, layer), so they cannot match the scanned stack's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

# the batch contract (two packed documents a row, so segment ids matter) and the sharded run,
# built as the 8-device sharding checks build them
from test_sharding import _run_for, _synthetic_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STEPS, LOSS_RTOL = 5, 1e-5
# As tests/test_sharding.py: params to rtol 1e-5 + atol 1e-5 (a real pipeline bug moves them by O(lr));
# gradients to rtol 1e-4 + atol 1e-6 of one step's gradient (rows summed in another order).
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
PIPELINES = {"stage2": dict(data=4, stage=2),
             "stage2_circular": dict(data=4, stage=2, pipeline_repeats=2, pipeline_microbatches=4),
             "stage2_fsdp2": dict(data=2, stage=2, fsdp=2, pipeline_microbatches=2),
             # all three splits at once (issue 27): the striped sequence's token order rides through the stages
             "stage2_context2_fsdp2": dict(data=1, stage=2, fsdp=2, context=2, pipeline_microbatches=2)}


def run_worker(name: str, *args: str, timeout: int = 900) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), name, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _config(layout="dp", **mesh):
    from matrixmagic.configs.train_config import MeshConfig, train_config_for

    config = train_config_for("gpt-tiny", steps=STEPS)
    model = config.model.replace(d_model=32, num_heads=4, d_ff=64, num_layers=4, vocab_size=128, max_len=16,
                                 dropout_rate=0.0)
    return dataclasses.replace(config, model=model, batch_size=16, mesh=MeshConfig(layout=layout, **mesh),
                               data=dataclasses.replace(config.data, seq_len=16))


# ----------------------------------------------------------------------------- 8-device checks


def test_stage2_trains_like_one_device():
    result = run_worker("equivalence")
    reference = result["reference"]
    assert len(reference["losses"]) == STEPS
    assert set(result["pipelines"]) == set(PIPELINES)
    for name, got in result["pipelines"].items():
        for a, b in zip(got["losses"], reference["losses"]):
            assert abs(a - b) <= LOSS_RTOL * abs(b), (name, got["losses"], reference["losses"])
        assert got["grad_excess"] <= 1.0, (name, got)  # first-step gradients, every leaf
        assert got["param_excess"] <= 1.0, (name, got)  # params after 5 steps
        assert got["layers_spec"][0] == "stage", (name, got)  # [L, ...] weights split over stages
        assert got["collective_permutes"] > 0, name  # activations move between stages on the device ring


def test_a_stage2_checkpoint_restores_onto_stage1_and_fsdp8_bit_exact(tmp_path):
    result = run_worker("restore", str(tmp_path / "run"))
    assert result["saved_step"] == 3
    for name in ("data8", "fsdp8"):
        assert result[name]["equal"], (name, result[name])
    assert result["fsdp8"]["layers_spec"][:2] == [None, "fsdp"]  # really restored into another layout


# ----------------------------------------------------------------------------- in-process (1 device)


@pytest.mark.parametrize("stage,repeats,micro,bad", [(2, 1, 4, None), (3, 1, 3, None), (4, 2, 8, None),
                                                       (1, 1, 0, None), (8, 1, 8, None), (4, 3, 8, None)])
def test_bubble_fraction_is_the_schedule_idle_share(stage, repeats, micro, bad):
    from matrixmagic.configs.pipeline import Schedule, bubble_fraction, idle_fraction

    schedule = Schedule(stage, repeats, micro or 1)
    assert idle_fraction(schedule) == pytest.approx(bubble_fraction(*schedule))
    assert schedule.iterations == schedule.repeats * schedule.microbatches + stage - 1
    assert bubble_fraction(4, 2, 8) < bubble_fraction(4, 1, 8) < bubble_fraction(4, 1, 4)  # repeats, M shrink it


@pytest.mark.parametrize("changes,field,words", [
    (dict(stage=3), "mesh.stage=3", r"num_layers=4 must split into .* 3 x 1 = 3"),
    (dict(stage=2, pipeline_repeats=4), "mesh.pipeline_repeats=4", r"2 x 4 = 8 equal chunks"),
    (dict(stage=2, pipeline_repeats=2, pipeline_microbatches=1), "mesh.pipeline_microbatches=1",
     r"at least mesh.stage=2"),
    (dict(stage=2, pipeline_microbatches=3), "mesh.pipeline_microbatches=3", r"divisor of 16"),
    (dict(pipeline_repeats=2), "mesh.pipeline_repeats=2", r"mesh.stage=1 runs none"),
    (dict(stage=2, pipeline_repeats=0), "mesh.pipeline_repeats=0", r"use 1"),
])
def test_bad_pipelines_name_the_field(changes, field, words):
    from matrixmagic.configs import ConfigError

    with pytest.raises(ConfigError, match=rf"{field} is invalid: .*{words}"):
        _config(**changes)


def test_unsupported_families_are_refused_naming_mesh_stage():
    from matrixmagic.configs import ConfigError
    from matrixmagic.configs.train_config import MeshConfig, train_config_for

    for preset in ("transformer-tiny", "bert-tiny"):
        with pytest.raises(ConfigError, match=r"mesh\.stage=2 is invalid: .* is not pipelined"):
            train_config_for(preset, mesh=MeshConfig(stage=2))
    with pytest.raises(ConfigError, match=r"model\.scan_layers=False is invalid"):
        config = _config()
        dataclasses.replace(config, model=config.model.replace(scan_layers=False), mesh=MeshConfig(stage=2))


def test_a_filled_stage_axis_is_checked_once_resolved():
    from matrixmagic.configs import ConfigError
    from matrixmagic.sharding.validate import validate_mesh

    with pytest.raises(ConfigError, match=r"mesh\.stage=8 is invalid: model\.num_layers=4"):
        validate_mesh(_config(data=1, stage=-1), 8)
    with pytest.raises(ConfigError, match=r"pipeline_microbatches=8 leaves 2 .* data-parallel size .* = 4"):
        validate_mesh(_config(data=4, stage=2, pipeline_microbatches=8), 8)
    assert validate_mesh(_config(data=4, stage=2), 8)["stage"] == 2


def test_stage1_keeps_its_rules_and_the_pipeline_its_params():
    """No pipeline: the table is what it was (the default run computes what it did); a pipeline
    splits 'layers' over 'stage' and adds no parameter."""
    import jax

    from matrixmagic.configs.pipeline import Schedule
    from matrixmagic.model import build_model
    from matrixmagic.model.stages import Pipeline
    from matrixmagic.sharding.rules import logical_rules, rules_for

    config = _config()
    assert dict(rules_for(config.mesh))["layers"] is None
    assert rules_for(config.mesh) == logical_rules("dp")
    assert dict(rules_for(_config(data=4, stage=2).mesh))["layers"] == "stage"
    ids = jax.numpy.zeros((4, 16), jax.numpy.int32)
    plain = jax.eval_shape(build_model(config.model).init, jax.random.PRNGKey(0), ids)
    piped = jax.eval_shape(build_model(config.model, Pipeline(Schedule(2, 2, 2))).init, jax.random.PRNGKey(0), ids)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, piped)


# ----------------------------------------------------------------------------- subprocess workers


def _grad_fn(config, run):
    """jit(grad of the train loss) under the run's mesh and rules, with the pipeline the step uses."""
    import jax

    from matrixmagic.model import build_model, objectives
    from matrixmagic.model.families import family_of
    from matrixmagic.sharding.partition import with_rules
    from matrixmagic.sharding.pipeline_parallel import pipeline_for

    def grads(params, batch):
        model = build_model(config.model, pipeline_for(config))
        return jax.grad(lambda p: objectives.loss_fn(family_of(config.model), model, p, batch, None,
                                                     train=True)[0])(params)
    return jax.jit(with_rules(grads, run.mesh, run.rules))


def _train(config, devices=None, steps=STEPS):
    import jax
    import numpy as np

    run = _run_for(config, devices)
    state = run.init_state(jax.random.PRNGKey(config.seed))
    rng, losses = np.random.default_rng(0), []
    first = run.put_batch(_synthetic_batch(np.random.default_rng(0), config.batch_size, 16, 128))
    grads = jax.device_get(_grad_fn(config, run)(state.params, first))
    for _ in range(steps):
        batch = _synthetic_batch(rng, config.batch_size, config.data.seq_len, config.model.vocab_size)
        state, metrics = run.train_step(state, run.put_batch(batch))
        losses.append(float(metrics["loss"]))
    return run, state, losses, grads


def _excess(got, ref, atol, rtol) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(g - r) / (atol + rtol * np.abs(r))))
               for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))


def _layers_spec(run) -> list:
    spec = run.state_shardings.params["decoder"]["layers"]["feed_forward"]["hidden"]["kernel"].spec
    return list(spec) + [None] * (3 - len(spec))


def _worker_equivalence() -> dict:
    import jax
    import numpy as np

    _, ref_state, ref_losses, ref_grads = _train(_config(), jax.devices()[:1])
    ref_params = jax.device_get(ref_state.params)
    out = {}
    for name, mesh in PIPELINES.items():
        config = _config("fsdp" if mesh.get("fsdp", 1) > 1 else "dp", **mesh)
        run, state, losses, grads = _train(config)
        batch = jax.tree.map(lambda x, s=run.batch_sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             _synthetic_batch(np.random.default_rng(0), config.batch_size, 16, 128))
        hlo = run.train_step.lower(run.abstract_state, batch).compile().as_text()
        out[name] = {"losses": losses, "layers_spec": _layers_spec(run),
                     "grad_excess": _excess(grads, ref_grads, GRAD_ATOL, GRAD_RTOL),
                     "param_excess": _excess(jax.device_get(state.params), ref_params, PARAM_ATOL, PARAM_RTOL),
                     "collective_permutes": hlo.count("collective-permute")}
    return {"reference": {"losses": ref_losses}, "pipelines": out}


def _worker_restore(workdir: str) -> dict:
    import jax
    import numpy as np

    from matrixmagic.train.checkpoint import Checkpointer

    config = _config(data=4, stage=2)
    _, state, _, _ = _train(config, steps=3)
    saved = jax.device_get(state.params)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(3, state, {}, config)
    ckpt.close()
    out = {"saved_step": Checkpointer(workdir, read_only=True).latest_step()}
    for name, layout, mesh in (("data8", "dp", dict(data=8)), ("fsdp8", "fsdp", dict(data=1, fsdp=8))):
        run = _run_for(_config(layout, **mesh))
        restored, _, _ = Checkpointer(workdir, read_only=True).restore(run.abstract_state, 3)
        got = jax.device_get(restored.params)
        out[name] = {"equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved))),
                     "layers_spec": [None if a is None else a for a in _layers_spec(run)]}
    return out


if __name__ == "__main__":
    print(json.dumps(globals()[f"_worker_{sys.argv[1]}"](*sys.argv[2:])))
