"""`magic compile`: slice names, the chip table, AOT compiles, loop-corrected FLOPs,
serialized executables, and behaviour without libtpu.

CI installs only the `test` extra (no libtpu): the CPU-mesh compile path always
runs; TPU-topology tests are skipped only when libtpu is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from run_helpers import write_code_corpus

from matrixmagic.configs import ConfigError
from matrixmagic.train import aot
from matrixmagic.train.cli import main
from matrixmagic.train.cli.flags import config_assignments
from matrixmagic.train.data.tokenizers import ByteTokenizer
from matrixmagic.train.planning import chips, plan
from matrixmagic.train.planning import compiled as report
from matrixmagic.train.run import abstract_batch, resolve_config, with_tokenizer_vocab

REPO = Path(__file__).resolve().parents[1]
# A micro GPT: compiles in about a second on CPU.
MICRO = ("model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.num_layers=2", "model.vocab_size=384",
         "model.max_len=16", "data.seq_len=16")
needs_libtpu = pytest.mark.skipif(not chips.libtpu_available(),
                                  reason="libtpu not installed (pip install 'matrixmagic[tpu]'); CPU paths still run")


def compile_config(preset: str, devices: int, *, mesh=None, batch=None, remat=None, microbatches=None,
                   assignments=(), platform="tpu"):
    """What `magic compile` resolves for these flags (train.cli.compile.config_for), bytes data."""
    args = argparse.Namespace(mesh=mesh, layout=None, batch=batch, remat=remat, microbatches=microbatches,
                              set=list(assignments))
    config = resolve_config(preset, config_assignments(args), devices=devices, platform=platform)
    return with_tokenizer_vocab(config, ByteTokenizer())


def micro_config(devices: int = 1, **kw):
    kw.setdefault("mesh", "data=-1")
    kw.setdefault("batch", 4)
    extra = kw.pop("extra", ())
    return compile_config("gpt-tiny", devices, assignments=MICRO + tuple(extra), platform="cpu", **kw)


# ----------------------------------------------------------------------------- names and chips


@pytest.mark.parametrize("spec, chips_, topology", [
    ("v5p-1024", 512, "v5p:8x8x8"), ("v5p-8", 4, "v5p:2x2x1"), ("v5p-2048", 1024, "v5p:8x8x16"),
    ("v4-8", 4, "v4:2x2x1"), ("v4-2048", 1024, "v4:8x8x16"), ("v5e-16", 16, "v5e:4x4"),
    ("v5e-8", 8, "v5e:2x4"), ("v6e-256", 256, "v6e:16x16"), ("v5p:4x4x8", 128, "v5p:4x4x8"),
])
def test_slice_names_map_to_google_topologies(spec, chips_, topology):
    target = chips.parse_target(spec)
    assert (target.kind, target.chips, target.topology) == ("tpu", chips_, topology)


def test_cpu_and_gpu_targets():
    assert chips.parse_target("cpu-8").kind == "cpu" and chips.parse_target("cpu-8").chips == 8
    gpu = chips.parse_target("h100x64")
    assert (gpu.kind, gpu.chips, gpu.chip.name) == ("gpu", 64, "h100")


@pytest.mark.parametrize("spec, words", [
    ("v5p-1000", "power of two"), ("v5p-4", "power of two"), ("v7-8", "unknown TPU"),
    ("b200x8", "unknown GPU"), ("tpu", "not a slice name"),
])
def test_bad_topology_names_the_fix(spec, words):
    with pytest.raises(ConfigError, match=words):
        chips.parse_target(spec)


def test_peak_flops_for_device_kind():
    assert chips.peak_flops_for_device_kind("TPU v5 lite") == 197e12  # not v5p's "TPU v5"
    assert chips.peak_flops_for_device_kind("TPU v5") == 459e12
    assert chips.peak_flops_for_device_kind("TPU v4") == 275e12
    assert chips.peak_flops_for_device_kind("TPU v6 lite") == 918e12
    assert chips.peak_flops_for_device_kind("NVIDIA H100 80GB HBM3") == 989e12
    assert chips.peak_flops_for_device_kind("NVIDIA H200") == 989e12  # not taken for an H100 by substring
    assert chips.CHIPS["h200"].hbm_bytes == 141 * 10**9
    with pytest.raises(KeyError):
        chips.peak_flops_for_device_kind("TPU v9 mega")


# ----------------------------------------------------------------------------- config and estimates


def test_compile_config_defaults_for_gpt3_175b():
    config = compile_config("gpt3-175b", 512, mesh="fsdp=-1,tensor=8", remat="full", microbatches=4)
    assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"  # the TPU default
    assert config.model.vocab_size == 50304  # GPT-3's table padded to 128; bytes data: ids past 260 masked
    assert config.model.num_valid_tokens == ByteTokenizer.vocab_size
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.layout) == (1, -1, 8, "fsdp+tp")
    assert config.data.seq_len == 2048
    assert config.batch_size == 1536  # 3.2M tokens / 2048, rounded down to a multiple of 64 x 4


def test_analytic_state_is_16_bytes_per_param_over_shards():
    config = compile_config("gpt3-175b", 512, mesh="fsdp=-1,tensor=8", remat="full", microbatches=4)
    est = plan.estimate(config, 512)
    assert est.state_bytes == pytest.approx(16 * est.params / 512)
    assert est.executed_flops > est.model_flops  # full remat recomputes part of the forward


def test_gpu_target_is_an_estimate(capsys):
    rc = main(["compile", "--preset", "gpt3-175b", "--topology", "h100x1024", "--mesh", "fsdp=-1,tensor=8",
               "--remat", "full", "--microbatches", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "ESTIMATE, not a compile" in out and "h100" in out


def test_parse_out_of_memory():
    oom = report.parse_out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                  "HLO temporaries (192.83G) exceeds available HBM (95.74G).")
    assert oom.shortfall == pytest.approx((192.83 - 95.74) * 2**30)
    assert report.parse_out_of_memory("INVALID_ARGUMENT: bad shape") is None


def test_loop_correction_arithmetic():
    config = micro_config(extra=("model.num_layers=6",), microbatches=2)
    # 1 layer costs 10, 2 layers 13: 3 per layer, so 6 layers cost 10 + 5 x 3 per microbatch
    assert report.loop_corrected(7.0, (10.0, 13.0), config) == 2 * (10 + 5 * 3)
    assert report.loop_corrected(7.0, None, config) is None
    unrolled = micro_config(extra=("model.scan_layers=False",), microbatches=2)
    assert report.loop_corrected(7.0, None, unrolled) == 14.0  # only the microbatch loop


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny"])
def test_abstract_batch_is_the_batch_magic_train_feeds(preset, tmp_path):
    """The AOT batch has exactly the keys, dtypes and shapes of the batches the pipeline gives
    `magic train` (train.loop.open_data) for the same config: for the encoder-decoder, each side
    gets half of data.seq_len on both paths."""
    from matrixmagic.train.loop import open_data

    (tmp_path / "src").mkdir()
    for i in range(12):
        (tmp_path / "src" / f"d{i}.txt").write_text(f"document {i}: " + "abcdefgh " * (5 + 3 * i))
    config = compile_config(preset, 1, mesh="data=-1", batch=2, platform="cpu", assignments=MICRO[:-2] + (
        "model.max_len=16", "data.seq_len=16", f"data.source={tmp_path / 'src'}", f"data.data_dir={tmp_path / 'd'}"))
    train_data, eval_sets = open_data(config, ByteTokenizer())
    fed = {k: (v.shape, np.dtype(v.dtype)) for k, v in train_data.batch(0).items()}
    lowered = {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract_batch(config, None).items()}
    assert fed == lowered == {k: (v.shape, np.dtype(v.dtype)) for k, v in eval_sets[""][0].items()}
    if preset == "transformer-tiny":
        assert fed["encoder_inputs"][0] == fed["decoder_inputs"][0] == (2, 8)
    aot.lower_step(config, jax.devices("cpu")[:1])  # the step accepts it (tracing only, no compile)


# ----------------------------------------------------------------------------- compiles (CPU, always run)


@pytest.fixture(scope="module")
def compiled_micro():
    """One CPU compile of a 3-layer scanned micro GPT, shared (CPU compiles take seconds)."""
    return aot.compile_step(micro_config(extra=("model.num_layers=3", "model.scan_unroll=1"), batch=8),
                            jax.devices("cpu")[:1])


def test_cpu_compile_reports_memory_and_flops(compiled_micro):
    assert compiled_micro.fits and compiled_micro.cost["flops"] > 0
    m = compiled_micro.memory
    assert m.total == m.arguments + m.outputs - m.alias + m.temporaries + m.code > 0
    assert m.alias > 0  # the state is donated: the new state reuses its buffers


def test_loop_corrected_flops_match_an_unrolled_compile(compiled_micro):
    """cost_analysis counts a loop body once; the correction must recover the loop-free count."""
    devices = jax.devices("cpu")[:1]
    flops = lambda config: aot.compile_step(config, devices).cost["flops"]
    scanned = compiled_micro.config
    calibration = tuple(flops(c) for c in report.calibration_configs(scanned))
    reference = flops(dataclasses.replace(scanned, model=scanned.model.replace(scan_layers=False)))
    raw = compiled_micro.cost["flops"]
    assert raw < 0.7 * reference  # the undercount being corrected
    assert report.loop_corrected(raw, calibration, scanned) == pytest.approx(reference, rel=0.01)


def _batch(run, config):
    rng = np.random.default_rng(0)
    b, t = config.batch_size, config.data.seq_len
    ids = rng.integers(0, config.model.vocab_size, size=(b, t), dtype=np.int32)
    return run.put_batch({"inputs": ids, "targets": np.roll(ids, -1, 1),
                          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                          "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)})


def test_serialized_step_round_trip(compiled_micro, tmp_path):
    """Serialize, load into a fresh run, take one step: the same numbers as the jitted step."""
    from matrixmagic.train.run import train_run

    config, path = compiled_micro.config, str(tmp_path / "step.bin")
    aot.save_executable(path, compiled_micro)
    _, run = train_run(config, compiled_micro.devices)
    warnings = []
    loaded = aot.load_train_step(path, run, config, warn=warnings.append)
    assert loaded is not run.train_step and not warnings
    batch, key = _batch(run, config), jax.random.PRNGKey(0)
    jitted_state, jitted_metrics = run.train_step(run.init_state(key), batch)
    loaded_state, loaded_metrics = loaded(run.init_state(key), batch)
    assert float(loaded_metrics["loss"]) == float(jitted_metrics["loss"])
    for a, b in zip(jax.tree.leaves(jitted_state), jax.tree.leaves(loaded_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_executable_falls_back_with_a_warning(compiled_micro, tmp_path):
    from matrixmagic.train.run import train_run

    path = str(tmp_path / "step.bin")
    aot.save_executable(path, compiled_micro)
    config = compiled_micro.config
    other = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, learning_rate=1e-2))
    _, run = train_run(other, compiled_micro.devices)
    warnings = []
    assert aot.load_train_step(path, run, other, warn=warnings.append) is run.train_step
    assert "optimizer.learning_rate" in warnings[0] and "compiling" in warnings[0]
    assert aot.load_train_step(str(tmp_path / "missing.bin"), run, other, warn=warnings.append) is run.train_step


def test_too_few_cpu_devices_says_how_to_get_them():
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=4096"):
        chips.target_devices(chips.parse_target("cpu-4096"))


def test_without_libtpu_tpu_targets_explain_and_cpu_mesh_still_compiles(monkeypatch, capsys):
    monkeypatch.setattr(chips, "libtpu_available", lambda: False)
    assert main(["compile", "--preset", "gpt-tiny", "--topology", "v5e-4"]) == 2
    err = capsys.readouterr().err
    assert "needs libtpu" in err and "matrixmagic[tpu]" in err and "cpu-8" in err
    args = ["compile", "--preset", "gpt-tiny", "--topology", "cpu-1", "--batch", "4", "--no-calibrate"]
    assert main(args + [f"--set={a}" for a in MICRO]) == 0
    assert "memory per device" in capsys.readouterr().out


def test_cli_on_a_fake_multi_device_cpu_mesh():
    """The documented recipe: XLA_FLAGS gives 4 CPU devices; fsdp x tensor over them."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-c", "import sys; from matrixmagic.train.cli import main; sys.exit(main())", "compile",
           "--preset", "gpt-tiny", "--topology", "cpu-4", "--mesh", "fsdp=2,tensor=2", "--batch", "8", "--no-calibrate"]
    done = subprocess.run(cmd + [f"--set={a}" for a in MICRO], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data=1 stage=1 fsdp=2 context=1 tensor=2 over 4 device(s), layout fsdp+tp" in done.stdout
    assert "memory per device" in done.stdout and "compiler, cost_analysis() raw" in done.stdout


# ----------------------------------------------------------------------------- TPU topology (needs libtpu)


@needs_libtpu
def test_tpu_topology_compile_fits_hbm():
    target = chips.parse_target("v5e-4")
    outcome = aot.compile_step(micro_config(4, mesh="fsdp=2,tensor=2", batch=8), chips.target_devices(target))
    assert outcome.fits and 0 < outcome.memory.total < target.chip.hbm_bytes
    assert outcome.devices[0].device_kind == "TPU v5 lite"
    assert "optimal_seconds" in outcome.cost  # the TPU cost model's own step estimate


@needs_libtpu
def test_tpu_out_of_memory_is_a_result_with_the_shortfall(capsys):
    args = ["compile", "--preset", "gpt-tiny", "--topology", "v5e-4", "--mesh", "fsdp=-1", "--batch", "4096"]
    big = ("model.d_model=64", "model.num_heads=2", "model.d_ff=128", "model.num_layers=2",
           "model.vocab_size=32768", "model.max_len=1024", "data.seq_len=1024")
    assert main(args + [f"--set={a}" for a in big]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "short by" in out and "GB) per device" in out


@needs_libtpu
def test_calibrate_takes_the_step_time_from_the_one_and_two_layer_compiles(capsys):
    """--calibrate: k (c1 + (L - 1)(c2 - c1)) from the TPU compiler's own optimal_seconds of the 1- and
    2-layer unrolled steps (compiled here again, independently), not the loop correction's model."""
    from matrixmagic.train.planning.compiled import calibration_configs

    flags = ["--preset", "gpt-tiny", "--topology", "v5e-4", "--mesh", "fsdp=2,tensor=2", "--batch", "8",
             "--microbatches", "2", *[f"--set={a}" for a in MICRO], "--set=model.num_layers=4", "--set=model.scan_unroll=1"]
    assert main(["compile", *flags, "--calibrate"]) == 0
    out = capsys.readouterr().out
    value, unit = re.search(r"compiler's own estimate \(optimal_seconds, 1- and 2-layer compiles\): ([\d.]+) "
                            r"(s|ms|us)/step", out).groups()
    got = float(value) * {"s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    config = compile_config("gpt-tiny", 4, mesh="fsdp=2,tensor=2", batch=8, microbatches=2,
                            assignments=MICRO + ("model.num_layers=4", "model.scan_unroll=1"))
    c1, c2 = (aot.compile_step(c, chips.target_devices(chips.parse_target("v5e-4"))).cost["optimal_seconds"]
              for c in calibration_configs(config))
    assert got == pytest.approx(2 * (c1 + 3 * (c2 - c1)), rel=2e-3)  # printed to 3 decimals
    assert main(["compile", *flags, "--calibrate", "--no-calibrate"]) == 2
    assert "--calibrate and --no-calibrate do not combine" in capsys.readouterr().err


def test_sweep_on_a_cpu_mesh_prints_a_ranked_table(capsys):
    args = ["compile", "--preset", "gpt-tiny", "--topology", "cpu-1", "--batch", "4", "--sweep",
            "--sweep-tensor", "1,2", "--sweep-remat", "none", "--sweep-microbatches", "1"]
    assert main(args + [f"--set={a}" for a in MICRO]) == 0
    out = capsys.readouterr().out
    assert "tensor=2: skipped (1 devices are not divisible by 2)" in out
    assert "1 of 1 compiled configurations fit, fastest first" in out and "fsdp=1,tensor=1" in out
    # A CPU mesh has no chip peak: the step is estimated at the host's measured one, not `inf s`.
    row = next(line for line in out.splitlines() if line.startswith("fsdp=1,tensor=1"))
    assert " inf s" not in row and float(row.split()[-2].replace(",", "")) > 0, row


# ----------------------------------------------------------------------------- compile what train runs


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return write_code_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny", "transformer-tiny"])
def test_compile_serialize_then_train_compiled_uses_the_executable(preset, small_corpus, tmp_path, capsys):
    """`magic compile <flags> --serialize X` then `magic train <same flags> --compiled X`: the
    executable is used (every family, the default bytes tokenizer, the platform's dtype)."""
    flags = ["--preset", preset, "--batch", "4", "--set", f"data.source={small_corpus}",
             "--set", f"data.data_dir={tmp_path / 'tfds'}", "--set", "steps=3", "--set", "eval_batches=1",
             "--set", "sample_tokens=0"]
    flags += [f"--set={a}" for a in MICRO]
    path = str(tmp_path / "step.bin")
    assert main(["compile", "--topology", "cpu-1", "--no-calibrate", "--serialize", path, *flags]) == 0
    assert "serialized the executable" in capsys.readouterr().out
    assert main(["train", "--workdir", str(tmp_path / "run"), "--compiled", path, *flags]) == 0
    out = capsys.readouterr()
    assert "not used" not in out.out + out.err, out.out
    assert "using the serialized train step (no compile)" in out.out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [3]  # it trained and evaluated with it
