"""`magic plan`: does it fit, how fast, and what does a token target cost; searches layouts.

  magic plan --preset gpt3-175b --topology v5p-1024 --tokens 300B --price-per-chip-hour 4.2
  magic plan --preset gpt3-175b --topology v5p-1024 --mesh fsdp=-1,tensor=8 --remat full --microbatches 4
  magic plan --preset gpt-tiny --topology cpu-8 --hbm 0.05     (a fake CPU mesh with a 50 MiB budget)
  magic plan --preset gpt3-175b --topology h100x1024 --tokens 300B   (GPUs: analytic, labelled)

With any of --mesh/--remat/--microbatches the layout is the user's: one compile. Without
them the layout is searched: fsdp x tensor splits (tensor a power of two that divides the
heads, at most 16), remat policies and microbatch counts are enumerated, pruned with the
analytic memory model (train/planning/plan.py `estimate`), ranked by analytic step time, and only
the best few are compiled; the fastest that fits (by the compiler's loop-corrected estimate)
and the runner-up are reported. `magic compile` keeps the raw report, --serialize and the
exhaustive --sweep grid; both share one compile path (train/planning/search.py
`compile_with_flops`). This module parses and checks the flags; the search and the report
are planning code (train/planning/search.py).

Exit status: 0 fits, 3 nothing fits (with the reason and, for a compiled config, its largest
allocations in model terms), 2 bad input (before anything is compiled).
"""

from __future__ import annotations

from functools import partial

from matrixmagic.configs import ConfigError
from matrixmagic.train.planning.budget import check_price, parse_tokens  # light: no jax
from matrixmagic.train.planning.chips import GiB, add_slices_arguments, parse_target, target_devices, with_slices

from .compile import config_for


def add_plan_arguments(p) -> None:
    p.add_argument("--topology", required=True, help="v5p-1024, v5e-16, v5p:8x8x8, cpu-8 (fake CPU mesh), "
                                                     "h100x64 / h200x64 (analytic estimate)")
    add_slices_arguments(p)
    p.add_argument("--tokens", help="token target, e.g. 300B, 1.4T or 3e11: total FLOPs, steps, days, chip-hours")
    p.add_argument("--price-per-chip-hour", type=float, help="your price per chip-hour (any currency): adds the "
                                                             "cost; there are no built-in prices")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOP utilization for the stated-MFU step time")
    p.add_argument("--hbm", type=float, metavar="GIB", help="memory budget per device in GiB (default: the "
                                                            "chip's HBM; a CPU mesh has none): a plan fits only "
                                                            "under it")
    p.add_argument("--max-compiles", type=int, default=4, help="search: compile at most this many candidates")
    p.add_argument("--no-calibrate", action="store_true",
                   help="for a loop without a static trip count (rare), skip the 1- and 2-layer calibration compiles")


def _budget_bytes(args, target):
    if args.hbm is not None:
        if not args.hbm > 0:
            raise ConfigError(f"--hbm {args.hbm} is invalid: give the per-device memory budget in GiB, e.g. "
                              f"--hbm 16.")
        return args.hbm * GiB
    return target.chip.hbm_bytes if target.chip else None


def explicit_layout(args) -> bool:
    """Did the user give the layout (one compile) rather than ask for a search?"""
    return any((args.mesh, args.remat, args.microbatches is not None, args.layout))


def main(args) -> int:
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu} is invalid: use a fraction in (0, 1], e.g. --mfu 0.5.")
    tokens = parse_tokens(args.tokens) if args.tokens is not None else None
    price = check_price(args.price_per_chip_hour)
    if args.max_compiles < 1:
        raise ConfigError(f"--max-compiles {args.max_compiles} is invalid: compile at least 1 candidate.")
    target = with_slices(parse_target(args.topology), args.slices, args.dcn_gbps)
    budget = _budget_bytes(args, target)
    explicit = explicit_layout(args)
    if target.kind == "gpu":
        from matrixmagic.train.planning.search import candidate_configs, plan_gpu

        make = partial(config_for, args, target.chips, "gpu")
        configs = [make()] if explicit else candidate_configs(make, target.chips)
        return plan_gpu(configs, target, explicit=explicit, mfu=args.mfu, tokens=tokens, price=price, budget=budget)
    if explicit:  # a mesh that does not divide the slice fails here, before libtpu or a compile
        from matrixmagic.sharding.mesh import axis_sizes

        axis_sizes(config_for(args, target.chips, target.kind).mesh, target.chips)
    devices = target_devices(target)
    from matrixmagic.train.planning import plan, search

    if explicit:
        config = config_for(args, len(devices), devices[0].platform)
        print("\n".join(plan.header(config, target, len(devices))
                        + ["  compiling the train step `magic train` runs..."]), flush=True)
        outcome, flops, seconds = search.compile_with_flops(config, devices, not args.no_calibrate)
        return search.report_one(config, outcome, flops, seconds, target, devices, args.mfu, tokens, price, budget,
                                 explicit_budget=args.hbm is not None)
    make = partial(config_for, args, len(devices), devices[0].platform)
    return search.search(search.candidate_configs(make, len(devices)), target, devices, mfu=args.mfu,
                         max_compiles=args.max_compiles, calibrate=not args.no_calibrate,
                         explicit_budget=args.hbm is not None or target.kind == "cpu", tokens=tokens, price=price,
                         budget=budget)
