"""Pipeline parallelism's schedule in numbers: stages S, circular repeats R, microbatches M.

The layers split into S stages on the `stage` mesh axis; each stage holds R chunks of
K = L / (S R) consecutive layers, so stage s runs layers r S K + s K + k (r < R, k < K):
with R = 1 that is one contiguous block (GPipe, Huang et al. 2019), with R > 1 the
"interleaved" schedule of Narayanan et al. 2021 ("Efficient Large-Scale Language Model
Training on GPU Clusters", section 2.2), where a microbatch loops through the stages R times.

The forward runs R M + S - 1 steps: at step t stage s works on item t - s (microbatch
(t - s) mod M, repeat (t - s) div M) when 0 <= t - s < R M, and idles otherwise. Every stage
idles S - 1 of those steps, so the fraction of stage-steps wasted, the bubble, is
(S - 1) / (R M + S - 1): more microbatches or more repeats shrink it (each repeat sends an
activation around the ring once more: R times the point-to-point traffic).

Lives in configs (no jax) so the config checks, the model (model/stages.py), the planner
(train/planning/) and benchmarks/bench_pipeline.py share one definition.
"""

from __future__ import annotations

from typing import NamedTuple

from .model_config import fail


class Schedule(NamedTuple):
    stages: int  # S: the size of the `stage` mesh axis
    repeats: int  # R: how many times a microbatch loops through the stages
    microbatches: int  # M: per train (or accumulation) microbatch, how many the pipeline splits it into

    @property
    def iterations(self) -> int:
        """Steps of the forward loop: R M items per stage, plus S - 1 to fill and drain."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.repeats, self.microbatches)


def bubble_fraction(stages: int, repeats: int, microbatches: int) -> float:
    """(S - 1) / (R M + S - 1): the idle share of the pipeline's stage-steps (GPipe, Huang et al.
    2019, section 2.3, with R = 1; Narayanan et al. 2021, section 2.2.1 for R interleaved chunks)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def idle_fraction(schedule: Schedule) -> float:
    """The bubble counted from the schedule itself: the (stage, step) pairs with no item to run,
    over all pairs. Equals `bubble_fraction`; benchmarks/bench_pipeline.py prints both."""
    S, R, M = schedule
    busy = sum(0 <= t - s < R * M for t in range(schedule.iterations) for s in range(S))
    return 1 - busy / (S * schedule.iterations)


def schedule_of(mesh, stages: int) -> Schedule:
    """The schedule a MeshConfig asks for once its stage count is known (-1 resolved):
    pipeline_microbatches=0 means one per stage, the fewest a circular schedule accepts."""
    return Schedule(stages, mesh.pipeline_repeats, mesh.pipeline_microbatches or stages)


def check_pipeline(config, stages: int) -> None:
    """Refuse a pipeline the model or the batch cannot take, naming the field; `config` is a
    TrainConfig, `stages` the resolved stage count (nothing to check at 1)."""
    mesh, model = config.mesh, config.model
    if mesh.pipeline_repeats < 1:
        fail("mesh.pipeline_repeats", mesh.pipeline_repeats, "use 1 (one pass through the stages) or more.")
    if mesh.pipeline_microbatches < 0:
        fail("mesh.pipeline_microbatches", mesh.pipeline_microbatches,
             "use 0 (one per stage) or a positive count.")
    if stages == 1:
        for name, default in (("pipeline_repeats", 1), ("pipeline_microbatches", 0)):
            if getattr(mesh, name) != default:
                fail(f"mesh.{name}", getattr(mesh, name), f"it shapes a pipeline, and mesh.stage=1 runs none: "
                                                          f"set mesh.stage > 1 or drop mesh.{name}.")
        return
    if model.family != "decoder":
        fail("mesh.stage", stages, f"pipeline stages split a decoder-only model's layer stack; the "
                                   f"{model.family!r} family is not pipelined: use mesh.stage=1 (and fsdp or tensor).")
    if not model.scan_layers:
        fail("model.scan_layers", False, "pipeline stages split the scanned [layers, ...] weights: set "
                                         "model.scan_layers=true, or mesh.stage=1.")
    S, R, M = schedule_of(mesh, stages)
    if model.num_layers % (S * R):
        field, value = ("mesh.pipeline_repeats", R) if R > 1 else ("mesh.stage", S)
        fail(field, value, f"model.num_layers={model.num_layers} must split into mesh.stage x "
                           f"mesh.pipeline_repeats = {S} x {R} = {S * R} equal chunks: choose sizes whose product "
                           f"divides {model.num_layers}.")
    if R > 1 and M < S:
        fail("mesh.pipeline_microbatches", M, f"a circular pipeline (mesh.pipeline_repeats={R}) sends each "
                                              f"microbatch round the {S} stages again, so it needs at least "
                                              f"mesh.stage={S} microbatches in flight: use {S} or more.")
    rows = config.batch_size // config.microbatches
    if rows % M:
        fail("mesh.pipeline_microbatches", M, f"the {rows} sequences of each step (batch_size / microbatches) "
                                              f"must split into equal pipeline microbatches: use a divisor of {rows}.")
