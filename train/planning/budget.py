"""From a token target to FLOPs, steps, days, chip-hours and cost: pure arithmetic.

`magic plan --tokens 300B` answers "how long and how much to train on D tokens":
  total FLOPs   D x FLOPs per token, two ways: 6 N D (Kaplan et al. 2020, the count
                GPT-3's Table D.1 uses) and 6 N + 12 L S h per token (PaLM, appendix B:
                attention's score and value products added; model/accounting.py)
  steps         ceil(D / tokens per step)
  wall time     steps x seconds per step (the caller says which step time: at a stated
                MFU, or the compiler's estimate)
  chip-hours    chips x wall hours; cost = chip-hours x price, only when a price is given
                (no built-in prices: they differ by region, commitment and date).
No jax, no config objects: plain numbers in, plain numbers out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from matrixmagic.configs.model_config import ConfigError

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str) -> float:
    """'300B', '1.4T', '3e11', '300000000' -> tokens; ConfigError naming --tokens otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([KMBGT]?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--tokens {text!r} is invalid: write a number of tokens, e.g. --tokens 300B, 1.4T or 3e11.")
    tokens = float(m[1]) * _SUFFIX[m[2].upper()]
    if tokens <= 0:
        raise ConfigError(f"--tokens {text!r} is invalid: the token target must be positive, e.g. --tokens 300B.")
    return tokens


def check_price(price: Optional[float]) -> Optional[float]:
    if price is not None and (price < 0 or not math.isfinite(price)):
        raise ConfigError(f"--price-per-chip-hour {price} is invalid: give your price per chip-hour in your "
                          f"currency, a number >= 0 (e.g. --price-per-chip-hour 4.2); leave it out for no cost line.")
    return price


def six_n_d(params: float, tokens: float) -> float:
    """Kaplan et al. 2020's training compute C = 6 N D (GPT-3 Table D.1's count)."""
    return 6.0 * params * tokens


@dataclasses.dataclass(frozen=True)
class Budget:
    """What training on `tokens` costs at `step_seconds` per step of `tokens_per_step` on `chips`."""

    tokens: float
    tokens_per_step: int
    flops_per_token: float  # 6N + 12LSh (attention-inclusive)
    chips: int
    step_seconds: float
    price_per_chip_hour: Optional[float] = None

    def __post_init__(self):
        if not self.tokens > 0:
            raise ConfigError(f"--tokens {self.tokens:g} is invalid: the token target must be positive.")
        if self.tokens_per_step < 1 or self.chips < 1 or not self.step_seconds > 0 or not self.flops_per_token > 0:
            raise ConfigError(f"a budget needs positive tokens per step ({self.tokens_per_step}), chips "
                              f"({self.chips}), step time ({self.step_seconds}) and FLOPs per token.")
        check_price(self.price_per_chip_hour)

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens

    @property
    def seconds(self) -> float:
        return self.steps * self.step_seconds

    @property
    def days(self) -> float:
        return self.seconds / 86400

    @property
    def chip_hours(self) -> float:
        return self.chips * self.seconds / 3600

    @property
    def cost(self) -> Optional[float]:
        return None if self.price_per_chip_hour is None else self.chip_hours * self.price_per_chip_hour


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days"
    return f"{seconds / 3600:,.1f} hours" if seconds >= 3600 else f"{seconds / 60:,.1f} minutes"


def budget_lines(tokens: float, params: int, flops_per_token: float, tokens_per_step: int, chips: int,
                 step_times: list[tuple[str, float]], price: Optional[float]) -> list[str]:
    """The token-target block of `magic plan`: total FLOPs two ways, steps, then per step time
    (label, seconds) the wall time, chip-hours and, with a price, the cost."""
    paper = six_n_d(params, tokens)
    ours = flops_per_token * tokens
    lines = [f"training on {tokens:,.0f} tokens ({tokens / 1e9:,.4g}B)",
             f"  total FLOPs  {paper:.3e}  6 N D (Kaplan et al. 2020; GPT-3 Table D.1 counts this way)",
             (f"               {ours:.3e}  6 N + 12 L S h per token (attention's S x S products too: "
              f"{ours / paper - 1:+.1%}); = {ours / 8.64e19:,.4g} PF-days")]
    steps = math.ceil(tokens / tokens_per_step)
    lines.append(f"  steps        {steps:,} of {tokens_per_step:,} tokens")
    for label, seconds in step_times:
        b = Budget(tokens, tokens_per_step, flops_per_token, chips, seconds, price)
        cost = f", cost {b.cost:,.2f} at {price:g}/chip-hour" if b.cost is not None else ""
        lines.append(f"  {label:34s} {_duration(b.seconds)} on {chips} chips = {b.chip_hours:,.5g} chip-hours{cost}")
    if price is None:
        lines.append("  (no cost: give --price-per-chip-hour X in your currency; there are no built-in prices)")
    return lines
