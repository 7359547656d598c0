"""`magic compile`: plan a pod-scale run on a laptop.

  magic compile --preset gpt3-175b --topology v5p-1024 --mesh fsdp=-1,tensor=8 --remat full --microbatches 4
  magic compile --preset gpt-tiny --topology cpu-8        (XLA_FLAGS=--xla_force_host_platform_device_count=8)
  magic compile --preset gpt3-175b --topology h100x1024   (analytic estimate: no compiler for GPUs here)
  magic compile ... --serialize step.bin   then on the pod:   magic train ... --compiled step.bin
  magic compile ... --sweep                 meshes x remat x microbatches, fastest first

The config is `train.run.resolve_config` of the same flags `magic train` takes, for the
target's device count and platform: what is compiled here is what train would run.

Exit status: 0 fits, 3 does not fit (a result, printed with the shortfall), 2 config error.
jax-heavy modules are imported inside the functions: the CLI imports this module for
its flags, and `magic --help` or `magic params` should not wait for jax.
"""

from __future__ import annotations

import time

from matrixmagic.configs import ConfigError
from matrixmagic.train.planning.chips import (  # light import
    Target,
    add_slices_arguments,
    parse_target,
    target_devices,
    with_slices,
)

from .. import sealed, storage
from .paths import check_output_file


def config_for(args, devices: int, platform: str, **flags):
    """THE config `magic train` would run with these flags on `devices` devices of `platform`;
    `flags` override the parsed ones (mesh, layout, remat, microbatches, batch)."""
    from ..run import resolve_config, run_tokenizer, sized_for_data
    from .flags import config_assignments

    assignments = config_assignments(args, **flags)
    slices = getattr(args, "slices", None) or 1
    assignments.update(slice_assignments(flags.get("mesh", args.mesh), assignments, slices))
    config = resolve_config(args.preset, assignments, devices=devices, platform=platform)
    return sized_for_data(config, run_tokenizer(config), devices)  # as train.loop.train does


def slice_assignments(mesh_text, assignments: dict, slices: int) -> dict:
    """`--slices N`: the slices split the data axis (mesh.dcn_data = N). A --mesh that does not
    name `data` gets data = N (one replica per slice, the other axes inside each slice)."""
    if slices == 1:
        return {}
    given = assignments.get("mesh.dcn_data")
    if given is not None and given != slices:
        raise ConfigError(f"--slices {slices} and mesh.dcn_data={given} disagree: the slices are what the data "
                          f"axis crosses; drop mesh.dcn_data (--slices sets it) or make them equal.")
    named = {item.partition("=")[0].strip() for item in (mesh_text or "").split(",")}
    out = {"mesh.dcn_data": slices}
    if mesh_text and "data" not in named:
        out["mesh.data"] = slices
    return out


def report_gpu(args, target: Target) -> int:
    from matrixmagic.train.planning import plan
    from matrixmagic.train.planning.search import NOT_FIT

    assert target.chip is not None  # a GPU target always names its chip
    config = config_for(args, target.chips, "gpu")
    est = plan.estimate(config, target.chips)
    lines = plan.header(config, target, target.chips)
    lines += ["", "ESTIMATE, not a compile: no XLA compiler for a GPU cluster runs here; these are closed forms.", ""]
    lines += plan.estimate_lines(est, target.chip.hbm_bytes, "memory per device (analytic)")
    lines += [""] + plan.flops_lines(est, target.chips, None, None, config.model.remat_policy)
    lines += [""] + plan.throughput_lines(est, target.chips, target.chip.peak_bf16_flops, args.mfu,
                                          target.chip.name, None)
    print("\n".join(lines))
    return 0 if est.total_bytes <= target.chip.hbm_bytes else NOT_FIT


def report_compile(args, target: Target, devices: list) -> int:
    from matrixmagic.train.planning import plan
    from matrixmagic.train.planning.search import NOT_FIT, compile_with_flops, device_peak

    config = config_for(args, len(devices), devices[0].platform)
    hbm = target.chip.hbm_bytes if target.chip else None
    print("\n".join(plan.header(config, target, len(devices))), flush=True)
    print("  compiling the train step `magic train` runs (train.run.train_run)...", flush=True)
    outcome, flops, seconds = compile_with_flops(config, devices, not args.no_calibrate,
                                                 calibrated_time=args.calibrate)
    print()
    est = plan.estimate(config, len(devices))
    if not outcome.fits:
        lines = plan.oom_lines(outcome.oom, config, est, hbm, len(devices))
        lines += [""] + plan.estimate_lines(est, hbm, "analytic cross-check (per device)")
        print("\n".join(lines))
        return NOT_FIT
    peak, chip_name = device_peak(target, devices)
    lines = plan.memory_lines(outcome, hbm)
    lines.append(f"  analytic     {plan.gib(est.state_bytes)} state + {plan.gib(est.activation_bytes).strip()} "
                 f"activations (closed forms, train/planning/plan.py)")
    lines += [""] + plan.flops_lines(est, len(devices), outcome.cost.get("flops"), flops, config.model.remat_policy)
    lines += [""] + plan.throughput_lines(est, len(devices), peak, args.mfu, chip_name, seconds,
                                          plan.dcn_seconds(config, target, outcome.dcn_bytes),
                                          "1- and 2-layer compiles" if calibrated(args, config) else "loop-corrected")
    if args.serialize:
        from ..aot import save_executable

        try:
            size = save_executable(args.serialize, outcome)
        except Exception as err:  # past the up-front check: a full disk, a lying filesystem, a refused upload
            if storage.is_remote(args.serialize):
                raise storage.classify(err, args.serialize, "--serialize") from None
            if not isinstance(err, OSError):
                raise
            raise ConfigError(f"--serialize {args.serialize!r} could not be written ({err.strerror or err}): give "
                              f"a path with room that you can write.") from None
        lines += ["", (f"serialized the executable to {args.serialize} ({size / 2**20:.1f} MiB). On the pod, with "
                       f"the same flags: magic train --preset {config.preset} ... --compiled {args.serialize} "
                       f"(it checks the config, trees and shapes, and compiles instead if they differ). It is "
                       f"sealed with this machine's key, and only a machine with the same key loads it: on the "
                       f"pod, set the same {sealed.KEY_ENV} (or copy {sealed.key_path()})")]
    print("\n".join(lines))
    return 0  # the compiler accepted it: on TPU that is its own HBM check


# ----------------------------------------------------------------------------- sweep


def calibrated(args, config) -> bool:
    """Whether --calibrate's 1- and 2-layer compiles gave the step time (a scanned layer loop to
    calibrate; with the layers unrolled the loop correction stands, and search.py logs why)."""
    from matrixmagic.train.planning.compiled import needs_calibration

    return args.calibrate and needs_calibration(config)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is invalid: write comma-separated integers, e.g. {flag} 1,4,8.") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} is invalid: use positive integers.")
    return values


def sweep_rows(args, target: Target, devices: list, log=None) -> list[dict]:
    """Per (tensor, remat): the smallest microbatch count that fits, calibrated; failures too.

    Why the smallest: more microbatches only shrink the matmuls and add loop
    overhead, so once one fits the larger counts are slower; out-of-memory
    compiles fail in seconds, so trying the small counts first is cheap."""
    from matrixmagic.train.planning import plan, search

    log = log or search.log
    n, platform = len(devices), devices[0].platform
    base = config_for(args, n, platform)
    tensors = _ints(args.sweep_tensor, "--sweep-tensor")
    for t in [t for t in tensors if n % t]:
        log(f"tensor={t}: skipped ({n} devices are not divisible by {t})")
    tensors = [t for t in tensors if n % t == 0]
    heads = base.model.num_heads  # the tensor axis splits the heads: a size they cannot split fails at every k
    if [t for t in tensors if heads % t]:
        log(f"tensor={','.join(str(t) for t in tensors if heads % t)}: skipped ({base.preset} has {heads} heads, "
            f"and the tensor axis splits them)")
    tensors = [t for t in tensors if heads % t == 0]
    remats = [r.strip() for r in args.sweep_remat.split(",") if r.strip()]
    micro = sorted(_ints(args.sweep_microbatches, "--sweep-microbatches"))
    rows, total = [], len(tensors) * len(remats)
    for i, (tensor, remat) in enumerate((t, r) for t in tensors for r in remats):
        for k in micro:
            label = f"[{i + 1}/{total}] tensor={tensor} (fsdp the rest) remat={remat} microbatches={k}"
            try:
                config = config_for(args, n, platform, mesh=f"fsdp=-1,tensor={tensor}", layout=None, remat=remat,
                                 microbatches=k, batch=base.batch_size)
            except ConfigError as err:
                log(f"{label}: skipped ({err})")
                continue
            start = time.perf_counter()
            log(f"{label}: compiling...")
            outcome, flops, seconds = search.compile_with_flops(config, devices, True, log=log)
            row = dict(mesh=plan.mesh_text(config, n), tensor=tensor, remat=remat, microbatches=k, fits=outcome.fits,
                       memory=outcome.memory.total if outcome.fits else None, flops=flops, seconds=seconds,
                       shortfall=outcome.oom.shortfall if outcome.oom else None,
                       wall=time.perf_counter() - start, config=config)
            rows.append(row)
            estimate = f", est. {plan.seconds_text(seconds)}/step" if seconds else ""
            log(f"{label}: " + (f"fits ({row['memory'] / 2**30:.2f} GiB){estimate}" if outcome.fits
                                else "does not fit") + f" ({row['wall']:.0f} s)")
            if outcome.fits:
                break
    return rows


def main(args) -> int:
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} is invalid: use a fraction in (0, 1], e.g. --mfu 0.5.")
    if args.sweep and args.serialize:
        raise ConfigError("--sweep and --serialize do not combine: sweep first, then compile the chosen "
                          "configuration alone with --serialize PATH.")
    if args.calibrate and (args.no_calibrate or args.sweep or (args.slices or 1) > 1):
        other = "--no-calibrate" if args.no_calibrate else "--sweep" if args.sweep else f"--slices {args.slices}"
        raise ConfigError(f"--calibrate and {other} do not combine: --calibrate times one slice's single "
                          f"compile; drop one of them.")
    if args.serialize:  # local or gs:// (a pod's hosts share only the bucket): checked by a real write
        args.serialize = check_output_file(args.serialize, "--serialize")
    target = with_slices(parse_target(args.topology), args.slices, args.dcn_gbps)
    if target.kind == "gpu":
        return report_gpu(args, target)
    devices = target_devices(target)
    if args.sweep:
        from matrixmagic.train.planning.search import NOT_FIT, device_peak, sweep_table

        rows = sweep_rows(args, target, devices)  # a CPU mesh has no chip peak: the host's measured one
        print("\n" + sweep_table(rows, target, len(devices), args.mfu, peak=device_peak(target, devices)[0]))
        return 0 if any(r["fits"] for r in rows) else NOT_FIT
    return report_compile(args, target, devices)


def add_compile_arguments(p) -> None:
    """The flags of `magic compile` besides the config flags it shares with `magic train` (flags.py)."""
    p.add_argument("--topology", required=True,
                   help="v5p-1024 (v4/v5p count TensorCores, 2 per chip), v5e-16 / v6e-64 (chips), v5p:8x8x8, "
                        "cpu-8 (this host's CPU devices), h100x64 (analytic estimate)")
    add_slices_arguments(p)
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOP utilization for the throughput estimate")
    p.add_argument("--serialize", metavar="PATH", help="save the compiled executable for magic train --compiled")
    p.add_argument("--no-calibrate", action="store_true",
                   help="for a loop without a static trip count (rare), skip the 1- and 2-layer compiles "
                        "that would correct cost_analysis")
    p.add_argument("--calibrate", action="store_true",
                   help="also compile 1 and 2 unrolled layers and take the step time from them: the TPU "
                        "compiler's own figure, where the default (loop-corrected) step time is a model")
    p.add_argument("--sweep", action="store_true", help="search meshes x remat x microbatches; table of what fits")
    p.add_argument("--sweep-tensor", default="1,4,8,16", help="mesh.tensor sizes to try (fsdp fills the rest)")
    p.add_argument("--sweep-remat", default="none,save_dots,full", help="remat policies to try")
    p.add_argument("--sweep-microbatches", default="1,2,4,8,16", help="microbatch counts to try, smallest first")
