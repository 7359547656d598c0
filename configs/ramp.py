"""GPT-3's batch-size ramp as a table of whole steps, in plain Python integers.

Brown et al. 2020, Appendix B: "we also gradually increase the batch size linearly from a
small value (32k tokens) to the full value over the first 4-12 billion tokens of training".

How we make that a run with ONE compiled step shape: the batch grows in whole units of
the start batch (`start_rows` sequences). Level j = 1..n (n = full_rows / start_rows)
trains j * start_rows rows per step, and the step always takes the full [full_rows]
buffer, its inactive rows padding (train/step.py skips whole inactive microbatches).
Level boundaries are linear in tokens: a step runs at level

    min(n, 1 + floor(tokens_before * (n - 1) / ramp_tokens))

where tokens_before counts the tokens of every earlier step, so the batch is full once
ramp_tokens have been seen. The table holds each level's first step and the rows seen
before it; everything else is arithmetic on it, so the pipeline (which rows a step
reads), the loop (tokens seen), the CLI (print-config, the schedule plot) and the
train step (its active microbatches and learning-rate clock, train/ramp.py) read the
same numbers. Without a ramp the table has one level: full_rows every step.
"""

from __future__ import annotations

import bisect
import dataclasses


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    full_rows: int  # the run's batch_size
    start_rows: int  # the first level's rows (== full_rows: no ramp)
    tokens_per_row: int  # data.seq_len
    ramp_tokens: int  # tokens over which the batch grows (0: no ramp)
    first_steps: tuple[int, ...]  # level j's first step at index j - 1 (equal entries: a level skipped)
    rows_before_level: tuple[int, ...]  # rows of all steps before that first step

    @classmethod
    def build(cls, full_rows: int, tokens_per_row: int, start_rows: int = 0, ramp_tokens: int = 0) -> BatchRamp:
        """The table; start_rows must divide full_rows (TrainConfig checks it, naming the fields)."""
        if not ramp_tokens or not start_rows or start_rows >= full_rows:
            return cls(full_rows, full_rows, tokens_per_row, 0, (0,), (0,))
        if full_rows % start_rows:
            raise ValueError(f"start_rows={start_rows} must divide full_rows={full_rows}.")
        n = full_rows // start_rows
        first, before = [0], [0]
        step = rows = 0
        for j in range(1, n):
            # level j runs while tokens_before < j * ramp_tokens / (n - 1), i.e. rows < this:
            boundary_rows = _ceil_div(j * ramp_tokens, (n - 1) * tokens_per_row)
            steps = max(0, _ceil_div(boundary_rows - rows, j * start_rows))
            step, rows = step + steps, rows + steps * j * start_rows
            first.append(step)
            before.append(rows)
        return cls(full_rows, start_rows, tokens_per_row, ramp_tokens, tuple(first), tuple(before))

    # ------------------------------------------------------------------ per step

    @property
    def on(self) -> bool:
        return len(self.first_steps) > 1

    @property
    def levels(self) -> int:
        return len(self.first_steps)

    def level_rows(self, index: int) -> int:
        """Rows per step of level index + 1."""
        return (index + 1) * self.start_rows

    def _level(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        return bisect.bisect_right(self.first_steps, step) - 1

    def rows(self, step: int) -> int:
        """Active rows (sequences) of `step`."""
        return self.level_rows(self._level(step))

    def rows_before(self, step: int) -> int:
        """Rows of all steps before `step`: where `step` starts in the data stream."""
        j = self._level(step)
        return self.rows_before_level[j] + (step - self.first_steps[j]) * self.level_rows(j)

    def tokens_before(self, step: int) -> int:
        """Tokens of all steps before `step` (tokens seen after `step` steps), exactly."""
        return self.rows_before(step) * self.tokens_per_row

    def clock(self, step: int) -> float:
        """The learning-rate schedule's clock: tokens before `step` in full-batch steps (equals
        `step` without a ramp), so one schedule, in steps, serves both."""
        return self.rows_before(step) / self.full_rows

    def first_step_with(self, tokens: int) -> int:
        """The first step whose tokens_before >= `tokens`."""
        target = _ceil_div(max(0, tokens), self.tokens_per_row)
        for j in reversed(range(self.levels)):
            if self.rows_before_level[j] <= target:
                return self.first_steps[j] + _ceil_div(target - self.rows_before_level[j], self.level_rows(j))
        return 0

    # ------------------------------------------------------------------ the whole ramp

    @property
    def ramp_steps(self) -> int:
        """Steps before the batch is full (0 without a ramp)."""
        return self.first_steps[-1]

    def computed_rows(self, microbatches: int) -> tuple[int, int]:
        """(useful rows, computed rows) over the ramp's steps when whole microbatches of
        full_rows / microbatches rows without an active row are skipped: a microbatch that
        holds any active row computes all of its rows."""
        per_micro = self.full_rows // microbatches
        useful = computed = 0
        for j in range(self.levels - 1):
            steps = self.first_steps[j + 1] - self.first_steps[j]
            rows = self.level_rows(j)
            useful += steps * rows
            computed += steps * _ceil_div(rows, per_micro) * per_micro
        return useful, computed

    def summary(self, microbatches: int = 1) -> dict:
        """What --print-config and `magic schedule` show: JSON types only."""
        if not self.on:
            return {"on": False, "rows": self.full_rows}
        useful, computed = self.computed_rows(microbatches)
        shown = [j for j in range(self.levels) if j < 3 or j == self.levels - 1]
        return {
            "on": True,
            "start_rows": self.start_rows,
            "full_rows": self.full_rows,
            "levels": self.levels,
            "ramp_tokens": self.ramp_tokens,
            "steps_to_full_batch": self.ramp_steps,
            "tokens_before_full_batch": self.tokens_before(self.ramp_steps),
            "full_batch_steps_for_the_same_tokens": round(self.rows_before(self.ramp_steps) / self.full_rows, 1),
            "levels_shown": [{"level": j + 1, "rows": self.level_rows(j), "first_step": self.first_steps[j],
                              "tokens_before": self.rows_before_level[j] * self.tokens_per_row} for j in shown],
            "compiled_step_shapes": 1,  # every level feeds the same [full_rows] buffer
            "ramp_rows_useful_over_computed": round(useful / computed, 4) if computed else 1.0,
        }


def ramp_description(ramp: BatchRamp) -> str:
    """One line for the run header and `magic schedule`."""
    if not ramp.on:
        return "no batch ramp"
    tokens = ramp.tokens_before(ramp.ramp_steps)
    return (f"batch ramp {ramp.start_rows} -> {ramp.full_rows} rows in {ramp.levels} levels over "
            f"{_short(ramp.ramp_tokens)} tokens ({ramp.ramp_steps:,} steps, {_short(tokens)} tokens before the "
            f"full batch); one compiled step shape")


def _short(n: float) -> str:
    """12000000000 -> '12B', 374341632 -> '374.3M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"
