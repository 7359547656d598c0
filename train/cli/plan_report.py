"""What `magic plan` prints: one configuration's verdict, the search, the GPU estimate.

Imported only when `magic plan` runs (jax is imported inside these functions).
"""

from __future__ import annotations

import time
from typing import Optional

from matrixmagic.train.planning.chips import GiB

from .compile import NOT_FIT, _config, _log, _peak, compile_with_flops
from .plan import PRUNE_MARGIN, REMATS, candidate_configs


def fits(outcome, budget: Optional[float], explicit_budget: bool) -> bool:
    """The compiler accepted it (on TPU its own HBM check) and, with --hbm, its total is under it."""
    if not outcome.fits:
        return False
    return not explicit_budget or budget is None or outcome.memory.total <= budget


def step_times(est, devices: int, peak: float, mfu: float, compiler_seconds: Optional[float]) -> list:
    from matrixmagic.train.planning.plan import step_time

    times = [(f"at {mfu:.0%} MFU", step_time(est.model_flops, devices, peak, mfu))]
    if compiler_seconds:
        times.append(("at the compiler's estimate", compiler_seconds))
    return times


def token_lines(config, est, chips: int, times: list, tokens: Optional[float], price) -> list[str]:
    if tokens is None:
        return ["(give --tokens N, e.g. --tokens 300B, for total FLOPs, steps, days and chip-hours)"]
    from matrixmagic.model.accounting import training_flops_per_token
    from matrixmagic.train.planning.budget import budget_lines

    per_token = training_flops_per_token(config.model, est.params, config.data.seq_len)
    labelled = [(f"wall time {label}", seconds) for label, seconds in times]
    return budget_lines(tokens, est.params, per_token, est.tokens_per_step, chips, labelled, price)


def oom_explanation(outcome, config, devices: int, budget: Optional[float]) -> list[str]:
    """Why it does not fit, in model terms: the compiler's refusal (TPU) or our budget check."""
    from matrixmagic.train.planning import oom, plan

    est = plan.estimate(config, devices)
    if not outcome.fits:
        lines = plan.oom_lines(outcome.oom, config, est, budget, devices)
        allocations = oom.tpu_allocations(outcome.oom.details)
        if not allocations:
            lines.append("  (the compiler's refusal lists no buffers: below, the analytic model's largest terms)")
            allocations = oom.analytic_allocations(config, devices)
    else:
        total = outcome.memory.total
        lines = ["memory per device: DOES NOT FIT",
                 f"  needs {total / GiB:.2f} GiB (compiled.memory_analysis(): arguments + outputs - aliased + "
                 f"temporaries), budget {budget / GiB:.2f} GiB: short by {(total - budget) / GiB:.2f} GiB",
                 "  fix: " + ", ".join(plan.oom_fixes(config, est, budget, devices))]
        allocations = oom.hlo_allocations(outcome.compiled.as_text())
    return lines + [""] + oom.report_lines(allocations, config, devices, budget)


def report_one(config, outcome, flops, seconds, target, devices, mfu, tokens, price, budget,
               explicit_budget: bool) -> int:
    """One configuration's plan. `explicit_budget`: --hbm was given, so the compiled total must be
    under it; otherwise the compiler's acceptance is the verdict (on TPU its own HBM check)."""
    from matrixmagic.train.planning import plan

    n = len(devices)
    print()
    if not fits(outcome, budget, explicit_budget or target.kind == "cpu"):
        print("\n".join(oom_explanation(outcome, config, n, budget)))
        return NOT_FIT
    est = plan.estimate(config, n)
    peak, chip_name = _peak(target, devices)
    lines = plan.memory_lines(outcome, budget)
    lines += [""] + plan.flops_lines(est, n, outcome.cost.get("flops"), flops, config.model.remat_policy)
    lines += [""] + plan.throughput_lines(est, n, peak, mfu, chip_name, seconds)
    lines += [""] + token_lines(config, est, n, step_times(est, n, peak, mfu, seconds), tokens, price)
    print("\n".join(lines))
    return 0


def _label(config) -> str:
    return (f"tensor={config.mesh.tensor} (fsdp the rest) remat={config.model.remat_policy} "
            f"microbatches={config.microbatches}")


def ranked(args, target, devices: list, budget: Optional[float], log=_log):
    """(groups to compile, best first; every layout; the smallest estimate). A group is one
    (tensor, remat) with its microbatch counts that the memory model lets through, fewest first:
    more microbatches only shrink the matmuls, so the fewest that fits is the fastest."""
    from matrixmagic.train.planning import plan

    n = len(devices)
    peak, _ = _peak(target, devices)
    rows = [(config, plan.estimate(config, n)) for config in candidate_configs(args, n, devices[0].platform)]
    smallest = min(rows, key=lambda r: r[1].total_bytes)
    keep = [r for r in rows if budget is None or r[1].total_bytes <= PRUNE_MARGIN * budget]
    groups: dict = {}
    for config, est in sorted(keep, key=lambda r: r[0].microbatches):
        groups.setdefault((config.mesh.tensor, config.model.remat_policy), []).append((config, est))

    def rank(group):  # FLOPs with recompute at peak (3 digits); among equals, the most headroom first
        config, est = group[0]
        return (float(f"{est.executed_flops / (n * peak):.3g}"), est.total_bytes, config.mesh.tensor)

    order = sorted(groups.values(), key=rank)
    log(f"search: {len(rows)} layouts; {len(rows) - len(keep)} pruned by the analytic memory model "
        f"(over {PRUNE_MARGIN:.2f} x the budget); {len(order)} (tensor, remat) groups left, ranked by analytic "
        f"step time (FLOPs with remat recompute at peak), then by headroom; compiling at most {args.max_compiles}")
    return order, rows, smallest


def search(args, target, devices: list, tokens, price, budget: Optional[float]) -> int:
    from matrixmagic.train.planning import plan

    from .compile import sweep_table

    n = len(devices)
    explicit_budget = args.hbm is not None or target.kind == "cpu"
    start = time.perf_counter()
    order, rows, smallest = ranked(args, target, devices, budget)
    if not order:
        config, est = smallest
        print(f"\nnothing fits: by the analytic memory model every one of {len(rows)} layouts needs more than "
              f"{PRUNE_MARGIN:.2f} x {budget / GiB:.2f} GiB per device; the smallest ({_label(config)}) needs "
              f"{est.total_bytes / GiB:.2f} GiB ({est.state_bytes / GiB:.2f} state + "
              f"{est.activation_bytes / GiB:.2f} activations)\n  fix: "
              + ", ".join(plan.oom_fixes(config, est, budget, n)))
        return NOT_FIT
    results, tried, queue = [], [], [list(g) for g in order]
    while queue and len(tried) < args.max_compiles and sum(t[4] for t in tried) < 2:
        group = queue.pop(0)
        config, est = group.pop(0)
        _log(f"[{len(tried) + 1}/{args.max_compiles}] {_label(config)}: analytic {est.total_bytes / GiB:.2f} GiB, "
             f"{plan.seconds_text(est.executed_flops / (n * _peak(target, devices)[0]))} at peak; compiling...")
        t0 = time.perf_counter()
        outcome, flops, seconds = compile_with_flops(config, devices, not args.no_calibrate)
        ok = fits(outcome, budget, explicit_budget)
        tried.append((config, outcome, flops, seconds, ok))
        memory = outcome.memory.total if outcome.memory else None
        short = (memory - budget) if (memory and budget and not ok) else (outcome.oom.shortfall if outcome.oom else None)
        results.append({"tensor": config.mesh.tensor, "fsdp": n // config.mesh.tensor,
                        "remat": config.model.remat_policy, "microbatches": config.microbatches, "fits": ok,
                        "memory": memory, "flops": flops, "seconds": seconds, "shortfall": short,
                        "wall": time.perf_counter() - t0, "config": config})
        _log(f"  {'fits' if ok else 'does not fit'}" + (f" ({memory / GiB:.2f} GiB)" if memory else ""))
        if not ok and group:  # the same layout with more microbatches goes next
            queue.insert(0, group)
    print("\n" + sweep_table(results, target, n, args.mfu, budget, _peak(target, devices)[0]))
    winners = sorted((t for t in tried if t[4]), key=lambda t: _compiled_seconds(t, target, devices))
    print(f"\nsearch took {time.perf_counter() - start:.0f} s")
    if not winners:
        config, outcome = tried[0][0], tried[0][1]
        print(f"\nnothing that was compiled fits; the analytic favourite, {_label(config)}:")
        print("\n".join(oom_explanation(outcome, config, n, budget)))
        return NOT_FIT
    best = winners[0]
    if len(winners) > 1:
        second = winners[1]
        print(f"runner-up: {_label(second[0])}, {plan.seconds_text(_compiled_seconds(second, target, devices))}/step "
              f"by the compiler ({_compiled_seconds(second, target, devices) / _compiled_seconds(best, target, devices):.2f}x "
              f"the winner's)")
    budget_text = f" of the {budget:,.0f}-byte budget" if budget else ""
    print(f"\nfastest that fits: {_label(best[0])}, compiled: {best[1].memory.total:,} bytes per device{budget_text}"
          f"\n  (magic plan ... --mesh fsdp=-1,tensor={best[0].mesh.tensor} --remat {best[0].model.remat_policy} "
          f"--microbatches {best[0].microbatches})")
    print("\n".join(plan.header(best[0], target, n)))
    return report_one(best[0], best[1], best[2], best[3], target, devices, args.mfu, tokens, price, budget,
                      explicit_budget)


def _compiled_seconds(tried, target, devices) -> float:
    """The compiler's loop-corrected step estimate, else its loop-corrected FLOPs at peak."""
    _, _, flops, seconds, _ = tried
    if seconds:
        return seconds
    return flops / _peak(target, devices)[0] if flops else float("inf")


def plan_gpu(args, target, tokens, price, budget) -> int:
    """GPU clusters: closed forms only (no GPU compiler runs on a CPU host), labelled so."""
    from matrixmagic.train.planning import plan

    from .plan import _explicit

    n = target.chips
    if _explicit(args):
        config = _config(args, n, "gpu")
    else:
        order, _, smallest = _gpu_ranked(args, target, budget)
        if not order:
            config, est = smallest
            print(f"ESTIMATE: nothing fits by the analytic memory model; the smallest layout ({_label(config)}) "
                  f"needs {est.total_bytes / GiB:.2f} GiB per GPU of {budget / GiB:.2f}.")
            return NOT_FIT
        config = order[0][0]
    est = plan.estimate(config, n)
    lines = plan.header(config, target, n)
    lines += ["", "ESTIMATE, not a compile: no XLA compiler for a GPU cluster runs on a CPU host; closed forms"
                  + ("" if _explicit(args) else "; layout searched by the analytic model alone"), ""]
    lines += plan.estimate_lines(est, budget, "memory per device (analytic)")
    lines += [""] + plan.flops_lines(est, n, None, None, config.model.remat_policy)
    lines += [""] + plan.throughput_lines(est, n, target.chip.peak_bf16_flops, args.mfu, target.chip.name, None)
    times = step_times(est, n, target.chip.peak_bf16_flops, args.mfu, None)
    lines += [""] + token_lines(config, est, n, times, tokens, price)
    print("\n".join(lines))
    return 0 if budget is None or est.total_bytes <= budget else NOT_FIT


def _gpu_ranked(args, target, budget):
    from matrixmagic.train.planning import plan

    n, peak = target.chips, target.chip.peak_bf16_flops
    rows = [(c, plan.estimate(c, n)) for c in candidate_configs(args, n, "gpu")]
    smallest = min(rows, key=lambda r: r[1].total_bytes)
    keep = [r for r in rows if budget is None or r[1].total_bytes <= budget]
    order = sorted(keep, key=lambda r: (r[1].executed_flops / (n * peak), REMATS.index(r[0].model.remat_policy),
                                        r[0].microbatches, r[0].mesh.tensor))
    return order, rows, smallest
