"""The one table mapping logical axis names to mesh axes, per layout.

Model code names every weight dimension ('embed', 'heads', 'mlp', ...); a
layout says which mesh axis, if any, splits each name:
  dp       params replicated, batch split over every device
  fsdp     batch split over data x fsdp; every weight matrix split over fsdp on
           its embed dimension (ZeRO-3: params, grads and Adam state sharded)
  tp       Megatron: heads and MLP hidden split over tensor (one all-reduce
           after attention and one after the MLP), batch over data
  fsdp+tp  both
Flax applies rules in order and never uses a mesh axis twice in one array, so
an activation [batch, length, embed] keeps 'fsdp' for the batch.
"""

from __future__ import annotations

LAYOUTS = ("dp", "fsdp", "tp", "fsdp+tp")


def logical_rules(layout: str) -> tuple[tuple[str, object], ...]:
    if layout not in LAYOUTS:
        from configs.model_config import ConfigError, suggest

        raise ConfigError(f"mesh.layout={layout!r} is invalid: choose one of {', '.join(LAYOUTS)}."
                          f"{suggest(layout, LAYOUTS)}")
    fsdp = "fsdp" in layout
    tp = "tp" in layout
    tensor = "tensor" if tp else None
    return (
        ("batch", ("data", "fsdp")),
        ("activation_batch", ("data", "fsdp")),
        ("vocab", tensor),
        ("heads", tensor),
        ("mlp", tensor),
        ("embed", "fsdp" if fsdp else None),
        ("kv", None),
        ("position", None),
        ("token_type", None),
        ("norm", None),
        ("layers", None),
        ("length", None),
    )
