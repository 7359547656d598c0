"""What `magic plan` reports: one configuration's verdict, the layout search, the GPU estimate;
and the compile path it shares with `magic compile` (loop-corrected FLOPs and step time).

Plain data in, lines out: the CLI (train/cli/plan.py, compile.py) parses the flags and turns
them into configs; nothing here reads an argparse namespace.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from matrixmagic.configs import ConfigError
from matrixmagic.model.accounting import training_flops_per_token
from matrixmagic.train import aot
from matrixmagic.train.metrics import peak_flops_per_device

from . import compiled as report
from . import oom, plan
from .budget import budget_lines
from .chips import GiB, Target, peak_flops_for_device_kind
from .loops import dcn_send_bytes, loop_corrected_cost

NOT_FIT = 3  # exit status: a result (it does not fit), not an error
PRUNE_MARGIN = 1.15  # the analytic model is a cross-check, not the verdict: compile what it puts within 15%
MAX_TENSOR = 16  # Megatron-style splits beyond 16 spend more on all-reduces than they save (8 is typical)
REMATS = ("none", "save_dots", "full")  # cheapest recompute first
MICROBATCHES = (1, 2, 4, 8, 16, 32)
STAGES = (1, 2, 4)  # pipeline stages: each costs a bubble, so only a few, for when nothing else fits
PIPELINE_MICROBATCHES = 4  # per stage: a bubble of (S - 1) / (4 S + S - 1), about 1/5 (configs/pipeline.py)
CONTEXTS = (1, 2, 4, 8)
LONG_CONTEXT = 8192  # tokens: below this the [S, S] scores of one sequence fit a chip; context splits are skipped


def log(message: str) -> None:
    print(message, flush=True)


def device_peak(target: Target, devices: list) -> tuple[float, str]:
    """Peak FLOP/s per device and where it comes from: the chip table, else the host's measured peak."""
    if target.chip is not None:
        return target.chip.peak_bf16_flops, target.chip.name
    return peak_flops_per_device(devices), "CPU: this host's measured matmul peak split over the fake devices"


def compile_with_flops(config, devices: list, calibrate: bool, log=log, calibrated_time: bool = False):
    """(outcome, loop-corrected flops, loop-corrected optimal_seconds) for one config.

    cost_analysis() counts each loop body once. The correction reads every loop's trip count
    from the optimized HLO and costs its body on its own (train/planning/loops.py): no extra compile.
    Only a loop without a static trip count falls back to the old calibration, two more
    compiles with 1 and 2 unrolled layers (skipped when `calibrate` is False).
    `calibrated_time`: compile those two anyway and take the step time from them, the TPU
    compiler's own figure for every op (the loop correction's time is a model: compute at the
    peak plus bytes at one rate, which over-charges loops that overlap collectives with matmuls)."""
    outcome = aot.compile_step(config, devices)
    log(f"  compile  lowered in {outcome.lower_seconds:.1f} s, compiled in {outcome.compile_seconds:.1f} s"
        + ("" if outcome.fits else " (out of memory)"))
    if not outcome.fits:
        return outcome, None, None
    if len(slice_groups(devices)) > 1:
        return multi_slice(config, outcome, devices, calibrate, log)
    assert outcome.cost is not None  # a compile that fits has its cost summary (aot.compile_step)
    start = time.perf_counter()
    try:
        peak = peak_flops_for_device_kind(outcome.devices[0].device_kind)
    except KeyError:  # a CPU mesh: no time model to correct
        peak = None
    fixed = report.hlo_loop_corrected(outcome.compiled, outcome.cost, peak)
    if fixed is not None:
        log(f"  loop-corrected the cost from the HLO's loop trip counts in {time.perf_counter() - start:.1f} s")
        if calibrated_time and not report.needs_calibration(config):
            log("  --calibrate: the layers are unrolled (no layer loop to calibrate): the loop-corrected time stands")
        if not (calibrated_time and report.needs_calibration(config) and "optimal_seconds" in fixed):
            return outcome, fixed.get("flops"), fixed.get("optimal_seconds")
        log(f"  loop-corrected step time (model): {fixed['optimal_seconds']:.3f} s")
    elif report.needs_calibration(config) and not calibrate:
        return outcome, None, None
    calib = {}
    if report.needs_calibration(config):
        log("  calibrating (" + ("--calibrate" if fixed is not None else "a loop without a static trip count")
            + "): compiling 1 and 2 unrolled layers, one microbatch...")
        extra = [aot.compile_step(c, devices) for c in report.calibration_configs(config)]
        log(f"  calibration compiled in {' + '.join(f'{e.compile_seconds:.1f}' for e in extra)} s")
        if all(e.fits for e in extra):
            one, two = extra[0].cost, extra[1].cost
            assert one is not None and two is not None  # compiles that fit have their cost summary
            calib = {k: (one[k], two[k]) for k in one if k in two}
    corrected = {k: report.loop_corrected(outcome.cost[k], calib.get(k), config)
                 for k in ("flops", "optimal_seconds") if k in outcome.cost}
    flops = fixed["flops"] if fixed is not None else corrected.get("flops")
    return outcome, flops, corrected.get("optimal_seconds")


def slice_groups(devices: list) -> list[list]:
    """The devices of each TPU slice (one group when they carry no slice index)."""
    groups: dict = {}
    for d in devices:
        groups.setdefault(getattr(d, "slice_index", 0), []).append(d)
    return list(groups.values())


def multi_slice(config, outcome, devices: list, calibrate: bool, log=log):
    """(outcome with its DCN bytes, loop-corrected flops, step seconds WITHOUT the DCN) of a
    multi-slice compile.

    libtpu's cost model gives no time for the cross-slice (DCN) transfers: its optimal_seconds
    comes out negative. So the time is the compiler's estimate for one slice running its own
    share (batch / S over the same per-slice mesh: the same per-device program but for the DCN
    all-reduce), and the DCN bytes are read from this program's HLO (loops.dcn_send_bytes) for
    plan.dcn_seconds to charge at the network's bandwidth."""
    sizes = dict(outcome.mesh_shape)
    slices = config.mesh.dcn_data
    groups = slice_groups(devices)
    counted = loop_corrected_cost(outcome.compiled.as_text(), dcn_send_bytes, keys=("dcn bytes",))
    outcome.dcn_bytes = counted["dcn bytes"] if counted else None
    twin = dataclasses.replace(config, batch_size=config.batch_size // slices,
                               mesh=dataclasses.replace(config.mesh, data=sizes["data"] // slices, dcn_data=1))
    log(f"  one slice's share (batch {twin.batch_size}, data={twin.mesh.data}) for the compiler's step time, "
        f"which it does not give across slices:")
    one, flops, seconds = compile_with_flops(twin, groups[0], calibrate, log)
    return outcome, (flops if one.fits else None), (seconds if one.fits else None)


def candidate_configs(make_config: Callable, devices: int) -> list:
    """Every (tensor, stage, context, remat, microbatches) layout that resolves, with the same
    global batch; fsdp fills the rest of the devices.

    `make_config(**flags)`: the config `magic train` would run with the user's flags and these
    overrides (mesh, layout, remat, microbatches, batch, sets); ConfigError when it does not
    resolve. Pipeline stages come with PIPELINE_MICROBATCHES x stage microbatches in flight (a
    bubble of about 1/PIPELINE_MICROBATCHES); context splits only for sequences of LONG_CONTEXT
    tokens or more, where the sequence, not the batch, is what no longer fits one chip."""
    base = make_config()
    heads, layers, seq = base.model.num_heads, base.model.num_layers, base.data.seq_len
    decoder = base.model.family == "decoder"
    tensors = [t for t in (1, 2, 4, 8, 16) if t <= min(devices, MAX_TENSOR) and devices % t == 0 and heads % t == 0]
    stages = [s for s in STAGES if s == 1 or (decoder and layers % s == 0)]
    contexts = [c for c in CONTEXTS if c == 1 or (decoder and seq >= LONG_CONTEXT and seq % (2 * c) == 0)]
    out = []
    for tensor, stage, context in ((t, s, c) for t in tensors for s in stages for c in contexts):
        if devices % (tensor * stage * context):
            continue
        mesh = f"fsdp=-1,tensor={tensor}" + (f",stage={stage}" if stage > 1 else "") + \
            (f",context={context}" if context > 1 else "")
        # the most pipeline microbatches (4, 2, then 1 per stage) that the batch splits into
        pipelines = [(f"mesh.pipeline_microbatches={m * stage}",) for m in (PIPELINE_MICROBATCHES, 2, 1)] \
            if stage > 1 else [()]
        for remat in REMATS:
            for k in MICROBATCHES:
                for sets in pipelines:
                    try:
                        out.append(make_config(mesh=mesh, layout=None, remat=remat, microbatches=k,
                                               batch=base.batch_size, sets=sets))
                        break
                    except ConfigError:
                        continue  # the batch does not split into k (pipeline) microbatches: not a candidate
    if not out:
        raise ConfigError(f"no layout of {devices} devices splits the batch of {base.batch_size}: give --batch "
                          f"a multiple of {devices}.")
    return out


def analytic_seconds(config, est, devices: int, peak: float) -> float:
    """FLOPs with remat recompute at peak, stretched by the pipeline's bubble: the search's ranking."""
    return est.executed_flops / (devices * peak) / (1 - plan.bubble(config, devices))


def split_lines(rows: list, kept: list, devices: int, peak: float) -> list[str]:
    """Why the search did or did not favour pipeline stages and context splits: each kind's best
    analytic candidate beside the best without it."""
    def best(pick):
        chosen = [(c, e) for c, e in kept if pick(c)]
        return min(chosen, key=lambda r: analytic_seconds(r[0], r[1], devices, peak)) if chosen else None

    lines = []
    plain = best(lambda c: c.mesh.stage == 1 and c.mesh.context == 1)
    for name, pick in (("stage", lambda c: c.mesh.stage > 1), ("context", lambda c: c.mesh.context > 1)):
        considered = [c for c, _ in rows if pick(c)]
        if not considered:
            why = ("the model is not decoder-only, or no stage count divides its layers" if name == "stage" else
                   f"data.seq_len={rows[0][0].data.seq_len} is under {LONG_CONTEXT:,} tokens: the sequence fits "
                   f"one chip, and splitting it only adds K/V traffic")
            lines.append(f"  {name} splits: none considered ({why})")
            continue
        top = best(pick)
        if top is None:
            lines.append(f"  {name} splits: {len(considered)} considered, all pruned by the memory model")
            continue
        config, est = top
        extra = f", bubble {plan.bubble(config, devices):.0%}" if name == "stage" else ""
        versus = (f" vs {plan.seconds_text(analytic_seconds(plain[0], plain[1], devices, peak))} for the best without "
                  f"({label(plain[0])})" if plain else " (nothing without it fits the memory model)")
        lines.append(f"  {name} splits: {len(considered)} considered; best {label(config)} "
                     f"{plan.seconds_text(analytic_seconds(config, est, devices, peak))}{extra}{versus}")
    return lines


def fits(outcome, budget: Optional[float], explicit_budget: bool) -> bool:
    """The compiler accepted it (on TPU its own HBM check) and, with --hbm, its total is under it."""
    if not outcome.fits:
        return False
    return not explicit_budget or budget is None or outcome.memory.total <= budget


def step_times(est, devices: int, peak: float, mfu: float, compiler_seconds: Optional[float],
               dcn: Optional[float] = None) -> list:
    extra, plus = (dcn, " + DCN") if dcn else (0.0, "")
    times = [(f"at {mfu:.0%} MFU{plus}", plan.step_time(est.model_flops, devices, peak, mfu) + extra)]
    if compiler_seconds:
        times.append((f"at the compiler's estimate{plus}", compiler_seconds + extra))
    return times


def token_lines(config, est, chips: int, times: list, tokens: Optional[float], price) -> list[str]:
    if tokens is None:
        return ["(give --tokens N, e.g. --tokens 300B, for total FLOPs, steps, days and chip-hours)"]
    per_token = training_flops_per_token(config.model, est.params, config.data.seq_len)
    labelled = [(f"wall time {label}", seconds) for label, seconds in times]
    return budget_lines(tokens, est.params, per_token, est.tokens_per_step, chips, labelled, price)


def oom_explanation(outcome, config, devices: int, budget: Optional[float]) -> list[str]:
    """Why it does not fit, in model terms: the compiler's refusal (TPU) or our budget check."""
    est = plan.estimate(config, devices)
    if not outcome.fits:
        lines = plan.oom_lines(outcome.oom, config, est, budget, devices)
        allocations = oom.tpu_allocations(outcome.oom.details)
        if not allocations:
            lines.append("  (the compiler's refusal lists no buffers: below, the analytic model's largest terms)")
            allocations = oom.analytic_allocations(config, devices)
    else:
        assert budget is not None  # fits() refuses a step the compiler accepted only against a budget
        total = outcome.memory.total
        lines = ["memory per device: DOES NOT FIT",
                 (f"  needs {total / GiB:.2f} GiB (compiled.memory_analysis(): arguments + outputs - aliased + "
                  f"temporaries), budget {budget / GiB:.2f} GiB: short by {(total - budget) / GiB:.2f} GiB"),
                 "  fix: " + ", ".join(plan.oom_fixes(config, est, budget, devices))]
        allocations = oom.hlo_allocations(outcome.compiled.as_text())
    return lines + [""] + oom.report_lines(allocations, config, devices, budget)


def report_one(config, outcome, flops, seconds, target, devices, mfu, tokens, price, budget,
               explicit_budget: bool) -> int:
    """One configuration's plan. `explicit_budget`: --hbm was given, so the compiled total must be
    under it; otherwise the compiler's acceptance is the verdict (on TPU its own HBM check)."""
    n = len(devices)
    print()
    if not fits(outcome, budget, explicit_budget or target.kind == "cpu"):
        print("\n".join(oom_explanation(outcome, config, n, budget)))
        return NOT_FIT
    est = plan.estimate(config, n)
    peak, chip_name = device_peak(target, devices)
    lines = plan.memory_lines(outcome, budget)
    lines += [""] + plan.flops_lines(est, n, outcome.cost.get("flops"), flops, config.model.remat_policy)
    dcn = plan.dcn_seconds(config, target, outcome.dcn_bytes)
    lines += [""] + plan.throughput_lines(est, n, peak, mfu, chip_name, seconds, dcn)
    lines += [""] + token_lines(config, est, n, step_times(est, n, peak, mfu, seconds, dcn), tokens, price)
    print("\n".join(lines))
    return 0


def label(config) -> str:
    splits = "".join(f" {a}={getattr(config.mesh, a)}" for a in ("stage", "context") if getattr(config.mesh, a) > 1)
    return (f"tensor={config.mesh.tensor}{splits} (fsdp the rest) remat={config.model.remat_policy} "
            f"microbatches={config.microbatches}")


def ranked(candidates: list, target, devices: list, budget: Optional[float], max_compiles: int, log=log):
    """(groups to compile, best first; every layout; the smallest estimate). A group is one
    (tensor, remat) with its microbatch counts that the memory model lets through, fewest first:
    more microbatches only shrink the matmuls, so the fewest that fits is the fastest."""
    n = len(devices)
    peak, _ = device_peak(target, devices)
    rows = [(config, plan.estimate(config, n)) for config in candidates]
    smallest = min(rows, key=lambda r: r[1].total_bytes)
    keep = [r for r in rows if budget is None or r[1].total_bytes <= PRUNE_MARGIN * budget]
    groups: dict = {}
    for config, est in sorted(keep, key=lambda r: r[0].microbatches):
        key = (config.mesh.tensor, config.mesh.stage, config.mesh.context, config.model.remat_policy)
        groups.setdefault(key, []).append((config, est))

    def rank(group):  # FLOPs with recompute at peak, with the bubble (3 digits); then the most headroom
        config, est = group[0]
        return (float(f"{analytic_seconds(config, est, n, peak):.3g}"), est.total_bytes, config.mesh.tensor)

    order = sorted(groups.values(), key=rank)
    log(f"search: {len(rows)} layouts; {len(rows) - len(keep)} pruned by the analytic memory model "
        f"(over {PRUNE_MARGIN:.2f} x the budget); {len(order)} (tensor, stage, context, remat) groups left, ranked "
        f"by analytic step time (FLOPs with remat recompute at peak, over 1 - the pipeline bubble), then by "
        f"headroom; compiling at most {max_compiles}")
    for line in split_lines(rows, keep, n, peak):
        log(line)
    return order, rows, smallest


def search(candidates: list, target, devices: list, *, mfu: float, max_compiles: int, calibrate: bool,
           explicit_budget: bool, tokens, price, budget: Optional[float]) -> int:
    """Compile the best few candidates (by the analytic model), report the fastest that fits.
    `explicit_budget`: --hbm was given, or a CPU mesh (no HBM of its own): the compiled total must be
    under `budget`."""
    n = len(devices)
    start = time.perf_counter()
    order, rows, smallest = ranked(candidates, target, devices, budget, max_compiles)
    if not order:
        assert budget is not None  # without a budget every layout is kept, so none is left only against one
        config, est = smallest
        print(f"\nnothing fits: by the analytic memory model every one of {len(rows)} layouts needs more than "
              f"{PRUNE_MARGIN:.2f} x {budget / GiB:.2f} GiB per device; the smallest ({label(config)}) needs "
              f"{est.total_bytes / GiB:.2f} GiB ({est.state_bytes / GiB:.2f} state + "
              f"{est.activation_bytes / GiB:.2f} activations)\n  fix: "
              + ", ".join(plan.oom_fixes(config, est, budget, n)))
        return NOT_FIT
    results: list[dict[str, Any]] = []
    tried: list[tuple[Any, report.CompileOutcome, Optional[float], Optional[float], bool]] = []  # config, ..., fits
    queue = [list(g) for g in order]
    while queue and len(tried) < max_compiles and sum(t[4] for t in tried) < 2:
        group = queue.pop(0)
        config, est = group.pop(0)
        log(f"[{len(tried) + 1}/{max_compiles}] {label(config)}: analytic {est.total_bytes / GiB:.2f} GiB, "
             f"{plan.seconds_text(analytic_seconds(config, est, n, device_peak(target, devices)[0]))} at peak; "
             f"compiling...")
        t0 = time.perf_counter()
        outcome, flops, seconds = compile_with_flops(config, devices, calibrate)
        ok = fits(outcome, budget, explicit_budget)
        tried.append((config, outcome, flops, seconds, ok))
        memory = outcome.memory.total if outcome.memory else None
        short = (memory - budget) if (memory and budget and not ok) else (outcome.oom.shortfall if outcome.oom else None)
        results.append({"mesh": plan.mesh_text(config, n), "tensor": config.mesh.tensor,
                        "remat": config.model.remat_policy, "microbatches": config.microbatches, "fits": ok,
                        "memory": memory, "flops": flops, "seconds": seconds, "shortfall": short,
                        "wall": time.perf_counter() - t0, "config": config})
        log(f"  {'fits' if ok else 'does not fit'}" + (f" ({memory / GiB:.2f} GiB)" if memory else ""))
        if not ok and group:  # the same layout with more microbatches goes next
            queue.insert(0, group)
    print("\n" + sweep_table(results, target, n, mfu, budget, device_peak(target, devices)[0]))
    winners = sorted((t for t in tried if t[4]), key=lambda t: _compiled_seconds(t, target, devices))
    print(f"\nsearch took {time.perf_counter() - start:.0f} s")
    if not winners:
        config, outcome = tried[0][0], tried[0][1]
        print(f"\nnothing that was compiled fits; the analytic favourite, {label(config)}:")
        print("\n".join(oom_explanation(outcome, config, n, budget)))
        return NOT_FIT
    best = winners[0]
    assert best[1].memory is not None  # a compile that fits has its memory analysis (aot.compile_step)
    if len(winners) > 1:
        second = winners[1]
        print(f"runner-up: {label(second[0])}, {plan.seconds_text(_compiled_seconds(second, target, devices))}/step "
              f"by the compiler ({_compiled_seconds(second, target, devices) / _compiled_seconds(best, target, devices):.2f}x "
              f"the winner's)")
    budget_text = f" of the {budget:,.0f}-byte budget" if budget else ""
    slices = f" --slices {target.slices}" if target.slices > 1 else ""
    if best[0].mesh.stage > 1:
        slices += f" --set mesh.pipeline_microbatches={best[0].mesh.pipeline_microbatches}"
    print(f"\nfastest that fits: {label(best[0])}, compiled: {best[1].memory.total:,} bytes per device{budget_text}"
          f"\n  (magic plan ... --mesh {plan.mesh_text(best[0], n)} --remat {best[0].model.remat_policy} "
          f"--microbatches {best[0].microbatches}{slices})")
    print("\n".join(plan.header(best[0], target, n)))
    return report_one(best[0], best[1], best[2], best[3], target, devices, mfu, tokens, price, budget,
                      explicit_budget)


def _compiled_seconds(tried, target, devices) -> float:
    """The compiler's loop-corrected step estimate, else its loop-corrected FLOPs at peak."""
    _, _, flops, seconds, _ = tried
    if seconds:
        return seconds
    return flops / device_peak(target, devices)[0] if flops else float("inf")


def plan_gpu(configs: list, target, *, explicit: bool, mfu: float, tokens, price, budget) -> int:
    """GPU clusters: closed forms only (no GPU compiler runs on a CPU host), labelled so.
    `explicit`: `configs` is the user's one layout; otherwise the candidates to search."""
    n = target.chips
    if explicit:
        config = configs[0]
    else:
        order, _, smallest = _gpu_ranked(configs, target, budget)
        if not order:
            config, est = smallest
            print(f"ESTIMATE: nothing fits by the analytic memory model; the smallest layout ({label(config)}) "
                  f"needs {est.total_bytes / GiB:.2f} GiB per GPU of {budget / GiB:.2f}.")
            return NOT_FIT
        config = order[0][0]
    est = plan.estimate(config, n)
    lines = plan.header(config, target, n)
    lines += ["", "ESTIMATE, not a compile: no XLA compiler for a GPU cluster runs on a CPU host; closed forms"
                  + ("" if explicit else "; layout searched by the analytic model alone"), ""]
    lines += plan.estimate_lines(est, budget, "memory per device (analytic)")
    lines += [""] + plan.flops_lines(est, n, None, None, config.model.remat_policy)
    lines += [""] + plan.throughput_lines(est, n, target.chip.peak_bf16_flops, mfu, target.chip.name, None)
    times = step_times(est, n, target.chip.peak_bf16_flops, mfu, None)
    lines += [""] + token_lines(config, est, n, times, tokens, price)
    print("\n".join(lines))
    return 0 if budget is None or est.total_bytes <= budget else NOT_FIT


def _gpu_ranked(candidates: list, target, budget):
    n, peak = target.chips, target.chip.peak_bf16_flops
    rows = [(c, plan.estimate(c, n)) for c in candidates]
    smallest = min(rows, key=lambda r: r[1].total_bytes)
    keep = [r for r in rows if budget is None or r[1].total_bytes <= budget]
    order = sorted(keep, key=lambda r: (analytic_seconds(r[0], r[1], n, peak), REMATS.index(r[0].model.remat_policy),
                                        r[0].microbatches, r[0].mesh.tensor))
    return order, rows, smallest


def sweep_table(rows: list[dict], target: Target, devices: int, mfu: float, hbm: Optional[float] = None,
                peak: Optional[float] = None) -> str:
    """The compiled configurations, those that fit fastest first, then those that do not."""
    hbm = hbm or (target.chip.hbm_bytes if target.chip else None)
    peak = peak or (target.chip.peak_bf16_flops if target.chip else None)

    def est_seconds(r):  # the compiler's optimal_seconds, else its FLOPs at peak
        if r["seconds"]:
            return r["seconds"]
        return r["flops"] / peak if (r["flops"] and peak) else float("inf")

    fit = sorted((r for r in rows if r["fits"]), key=est_seconds)
    head = f"{'mesh':24s} {'remat':10s} {'micro':>5s} {'memory':>10s} {'headroom':>10s} {'est. step':>11s} " \
           f"{'tokens/s':>12s} {'wall s':>7s}"
    lines = [(f"sweep on {target.spec}: {len(fit)} of {len(rows)} compiled configurations fit, fastest first "
              f"(by the compiler's loop-corrected optimal_seconds, else its FLOPs / peak)"), head, "-" * len(head)]
    for r in fit:
        s = est_seconds(r)
        room = f"{(hbm - r['memory']) / 2**30:8.2f}G" if hbm else "n/a"
        lines.append(f"{r['mesh']:24s} {r['remat']:10s} {r['microbatches']:5d} "
                     f"{r['memory'] / 2**30:9.2f}G {room:>10s} {plan.seconds_text(s):>11s} "
                     f"{r['config'].tokens_per_step / s:12,.0f} {r['wall']:7.0f}")
    for r in rows:
        if not r["fits"]:
            short = f"short by {r['shortfall'] / 2**30:.2f} GiB" if r["shortfall"] else "out of memory"
            lines.append(f"{r['mesh']:24s} {r['remat']:10s} "
                         f"{r['microbatches']:5d}   does not fit: {short}")
    return "\n".join(lines)
