"""The one table mapping logical axis names to mesh axes, per layout.

Model code names every weight dimension ('embed', 'heads', 'mlp', ...) and the
activations it pins ('activation_batch', 'activation_heads', ...); a layout says
which mesh axis, if any, splits each name:
  dp       params replicated, batch split over every device
  fsdp     batch split over data x fsdp; every weight matrix split over fsdp on
           its embed dimension (ZeRO-3: params, grads and Adam state sharded)
  tp       Megatron: heads and MLP hidden split over tensor (one all-reduce
           after attention and one after the MLP), batch over data
  fsdp+tp  both
Under tp, `mesh.sequence_parallel` (on by default) also splits the residual stream's
sequence over tensor between the blocks (Megatron's sequence parallelism,
Korthikanti et al. 2022, section 4.2.2): attention and the MLP read the whole
sequence ('activation_length'), everything between them ('activation_residual_length':
the norms, dropout, the residual adds and each layer's saved input) holds T / tensor
tokens, so XLA all-gathers before each block and reduce-scatters after it instead of
one all-reduce, the same bytes on the wire.
Activations keep separate names from weights so the two can be laid out
independently: a weight's 'embed' is split over fsdp, but the activations'
'activation_embed' stays whole (FSDP gathers weights, not activations).
Flax applies rules in order and never uses a mesh axis twice in one array, so
an activation [batch, length, embed] keeps 'fsdp' for the batch.

`mesh.rules_override` (a string, so it fits the frozen config and `--set`)
replaces entries of the table: "embed=fsdp,mlp=tensor,heads=none,batch=data+fsdp".
"""

from __future__ import annotations

from matrixmagic.configs.model_config import ConfigError, suggest
from matrixmagic.configs.train_config import LAYOUTS

from .mesh import AXES

BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None  # one mesh axis, several at once, or unsplit
Rules = tuple[tuple[str, MeshAxes], ...]


def layout_rules(layout: str, sequence_parallel: bool = True) -> Rules:
    """The base table for a named layout (no overrides); `sequence_parallel` matters under tp only."""
    if layout not in LAYOUTS:
        raise ConfigError(f"mesh.layout={layout!r} is invalid: choose one of {', '.join(LAYOUTS)}."
                          f"{suggest(layout, LAYOUTS)}")
    fsdp = "fsdp" if "fsdp" in layout else None
    tensor = "tensor" if "tp" in layout else None
    return (
        # activations: the batch is always split over every data-parallel axis
        ("activation_batch", BATCH_AXES),
        # context parallelism: the sequence split over `context` (size 1 by default: whole)
        ("activation_length", "context"),
        # the residual stream between the blocks: also split over tensor under sequence parallelism
        ("activation_residual_length", ("context", tensor) if tensor and sequence_parallel else "context"),
        ("activation_embed", None),
        ("activation_heads", tensor),
        ("activation_kv", None),
        ("activation_mlp", tensor),
        ("activation_vocab", tensor),
        # pipeline (model/stages.py): the leading [stages] dim of the activations in flight
        ("activation_stage", "stage"),
        # inputs (token ids, positions, masks)
        ("batch", BATCH_AXES),
        ("length", "context"),
        # weights
        ("vocab", tensor),
        ("heads", tensor),
        # grouped-query K/V heads (model/attention.py); when they do not divide tensor, validate.py says to
        # replicate them ('kv_heads=none'): every tensor shard then projects all of them, as Megatron does
        ("kv_heads", tensor),
        ("mlp", tensor),
        ("embed", fsdp),
        ("kv", None),
        ("position", None),
        ("token_type", None),
        ("norm", None),
        ("layers", None),
    )


LOGICAL_NAMES = tuple(name for name, _ in layout_rules("dp"))


def parse_rules_override(text: str) -> dict[str, MeshAxes]:
    """'embed=fsdp,mlp=tensor,heads=none,batch=data+fsdp' -> {logical name: mesh axes}.

    'none' leaves a dimension unsplit; 'a+b' splits it over two mesh axes at once.
    """
    out: dict[str, MeshAxes] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise ConfigError(f"mesh.rules_override item {item!r} is invalid: write logical=mesh_axis, "
                              f"e.g. 'embed=fsdp,mlp=tensor,heads=none'.")
        if name not in LOGICAL_NAMES:
            raise ConfigError(f"mesh.rules_override: {name!r} is not a logical axis name; use one of "
                              f"{', '.join(LOGICAL_NAMES)}.{suggest(name, LOGICAL_NAMES)}")
        axes = tuple(a.strip() for a in value.split("+")) if value.lower() not in ("", "none") else ()
        for axis in axes:
            if axis not in AXES:
                raise ConfigError(f"mesh.rules_override: {name}={value!r} names mesh axis {axis!r}; the mesh axes "
                                  f"are {', '.join(AXES)} (or 'none').{suggest(axis, AXES)}")
        out[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return out


def logical_rules(layout: str, override: str = "", sequence_parallel: bool = True) -> Rules:
    """The layout's table with `override` entries replacing its own, order kept."""
    table = layout_rules(layout, sequence_parallel)
    if not override:
        return table
    changes = parse_rules_override(override)
    return tuple((name, changes.get(name, axes)) for name, axes in table)


def rules_for(mesh_config) -> Rules:
    """The run's table. With pipeline stages the scanned weights' 'layers' dim is split over
    'stage' (stage s holds its contiguous block of layers: configs/pipeline.py); at stage=1
    the entry stays None, so a run without a pipeline has exactly the shardings it had."""
    table = logical_rules(mesh_config.layout, sequence_parallel=mesh_config.sequence_parallel)
    if mesh_config.stage != 1:
        table = tuple((name, "stage" if name == "layers" else axes) for name, axes in table)
    if not mesh_config.rules_override:
        return table
    changes = parse_rules_override(mesh_config.rules_override)
    return tuple((name, changes.get(name, axes)) for name, axes in table)


def sequence_parallel(mesh_config, tensor: int) -> bool:
    """Whether the run splits its residual stream over `tensor` (the axis resolved to `tensor` devices)."""
    return mesh_config.sequence_parallel and tensor > 1 and "tp" in mesh_config.layout


def mesh_axes_of(name: str, rules: Rules) -> tuple[str, ...]:
    """Mesh axes the first rule for `name` splits it over ('' -> ())."""
    for rule_name, axes in rules:
        if rule_name == name:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return ()
