"""Parameter, FLOP and memory accounting, checked against closed forms and papers.

`count_params` walks the real parameter tree from `jax.eval_shape(model.init)`;
`closed_form_params` derives the same number from the config alone, so each
checks the other. `training_flops_per_token` is PaLM's estimate
(Chowdhery et al. 2022, appendix B): 6N + 12 L T d, where N counts the weights
used in matmuls and 12 L T d is the attention score / value products.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
from flax import linen as nn

from matrixmagic.configs import ModelConfig, Preset

from .build import abstract_variables
from .embeddings import token_table_params
from .families import family_of
from .positional import position_table_params

CATEGORIES = ("embeddings", "attention", "mlp", "norms", "pooler", "output_head")


def categorize(path: tuple[str, ...]) -> str:
    """Which part of the model a parameter belongs to, from its path in the tree."""
    if "mlm_head" in path or "output_head" in path:
        return "output_head"
    if any(part.endswith("norm") for part in path):
        return "norms"
    if any("attention" in part for part in path):
        return "attention"
    if "feed_forward" in path:
        return "mlp"
    if "pooler" in path:
        return "pooler"
    if any("embedding" in part for part in path):
        return "embeddings"
    raise ValueError(f"parameter {'/'.join(path)} fits no accounting category; add it to categorize()")


def param_shapes(config: ModelConfig) -> dict:
    """{path tuple: shape} for every parameter, without allocating any."""
    params = nn.meta.unbox(abstract_variables(config)["params"])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(str(k.key) for k in path): leaf.shape for path, leaf in flat}


def count_params(config: ModelConfig) -> dict[str, int]:
    """Exact parameter count per category, from the real parameter tree."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for path, shape in param_shapes(config).items():
        counts[categorize(path)] += math.prod(shape)
    return counts


def closed_form_params(cfg: ModelConfig) -> dict[str, int]:
    """{'model': ..., 'mlm_head': ...} from the config alone (formulae, no tree): the family's
    own closed form (its model module), built from each sublayer's count."""
    return family_of(cfg).closed_form_params(cfg)


def attention_layers(cfg: ModelConfig) -> int:
    """Attention sublayers a token passes through (enc-dec: encoder self, decoder self and cross)."""
    return family_of(cfg).attention_sublayers * cfg.num_layers


def matmul_params(cfg: ModelConfig, total: int) -> int:
    """Weights used in matmuls: lookup-only tables (positions, token types, an untied
    input embedding) cost no FLOPs; a tied embedding is counted once, as the output layer."""
    lookup = position_table_params(cfg) + cfg.type_vocab_size * cfg.d_model
    if not cfg.tie_embeddings:
        lookup += token_table_params(cfg)
    return total - lookup


def training_flops_per_token(cfg: ModelConfig, total_params: int, seq_len: Optional[int] = None) -> float:
    """PaLM appendix B: 6 N + 12 L T d (forward + backward; T = context length)."""
    seq_len = seq_len or cfg.max_len
    return 6 * matmul_params(cfg, total_params) + 12 * attention_layers(cfg) * seq_len * cfg.d_model


def training_state_bytes(n_params: int) -> dict[str, dict[str, int]]:
    """Bytes of params, grads and Adam's two moments, per dtype."""
    return {dtype: {"params": n_params * size, "grads": n_params * size, "adam": 2 * n_params * size,
                    "total": 4 * n_params * size}
            for dtype, size in (("float32", 4), ("bfloat16", 2))}


@dataclasses.dataclass(frozen=True)
class ParamReport:
    name: str
    family: str
    params: int  # the model as its paper counts it (BERT: with pooler, without the MLM head)
    breakdown: dict
    mlm_head: int
    closed_form: int
    paper_params: Optional[int]
    relative_difference: Optional[float]
    flops_per_token: float
    seq_len: int
    memory_bytes: dict


def report(preset: Preset) -> ParamReport:
    cfg = preset.model
    breakdown = count_params(cfg)
    total = sum(breakdown.values())
    closed = closed_form_params(cfg)
    mlm_head = breakdown["output_head"] if family_of(cfg).head_reported_apart else 0
    params = total - mlm_head
    rel = (params - preset.paper_params) / preset.paper_params if preset.paper_params else None
    return ParamReport(
        name=preset.name, family=cfg.family, params=params, breakdown=breakdown, mlm_head=mlm_head,
        closed_form=closed["model"], paper_params=preset.paper_params, relative_difference=rel,
        flops_per_token=training_flops_per_token(cfg, total), seq_len=cfg.max_len,
        memory_bytes=training_state_bytes(total),
    )


def human(n: float, unit: str = "") -> str:
    """1.23 G, 45.00 MFLOP, ...: decimal SI prefixes for counts, FLOPs and bytes."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_report(r: ParamReport) -> str:
    """A readable block for one preset."""
    paper = "n/a" if r.paper_params is None else f"{r.paper_params:,} ({r.relative_difference:+.2%})"
    lines = [
        f"{r.name}  [{r.family}]",
        f"  parameters      {r.params:>18,}   closed form {r.closed_form:,}   paper {paper}",
        "  breakdown       " + "  ".join(f"{k} {human(v)}" for k, v in r.breakdown.items() if v),
    ]
    if r.mlm_head:
        lines.append(f"  MLM head        {r.mlm_head:>18,}   (pre-training head, not in the count above)")
    lines.append(f"  train FLOPs/tok {human(r.flops_per_token, 'FLOP'):>18}   (6N + 12·L·T·d, T={r.seq_len})")
    mem = r.memory_bytes
    lines.append("  train state     " + "   ".join(
        f"{dtype}: params {human(m['params'], 'B')} grads {human(m['grads'], 'B')} "
        f"adam {human(m['adam'], 'B')} total {human(m['total'], 'B')}" for dtype, m in mem.items()))
    return "\n".join(lines)
