"""Mesh checks that run before any data is read or anything compiles.

A bad mesh otherwise surfaces minutes later as an XLA error about uneven
shards or a hang across hosts; here each one names the config field and a fix.
"""

from __future__ import annotations

import math

from matrixmagic.configs.model_config import ConfigError
from matrixmagic.configs.pipeline import check_pipeline, schedule_of
from matrixmagic.configs.train_config import check_context_split

from .mesh import axis_sizes, check_dcn_divides
from .rules import BATCH_AXES, mesh_axes_of, rules_for


def model_dims(model) -> dict[str, tuple[str, int]]:
    """Logical weight axis -> (config field, size) for every dimension a rule may split."""
    dims = {
        "vocab": ("model.vocab_size", model.vocab_size),
        "embed": ("model.d_model", model.d_model),
        "heads": ("model.num_heads", model.num_heads),
        "kv": ("model.d_model // model.num_heads (head_dim)", model.head_dim),
        "mlp": ("model.d_ff", model.d_ff),
        "position": ("model.max_len", model.max_len),
        "layers": ("model.num_layers", model.num_layers),
    }
    if model.kv_heads != model.num_heads:
        dims["kv_heads"] = ("model.num_kv_heads", model.kv_heads)
    if model.type_vocab_size:
        dims["token_type"] = ("model.type_vocab_size", model.type_vocab_size)
    return dims


def check_batch(config, sizes: dict[str, int], process_count: int) -> None:
    """The global batch (and each microbatch) splits evenly over data x fsdp and over processes."""
    if config.batch_size % process_count:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes: each "
                          f"host loads an equal slice; use a multiple of {process_count}.")
    dp = math.prod(sizes[a] for a in BATCH_AXES)
    where = f"mesh.data x mesh.fsdp = {sizes['data']} x {sizes['fsdp']} = {dp}"
    if config.batch_size % dp:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the data-parallel size ({where}); "
                          f"use a multiple of {dp}, or change the mesh.")
    micro = config.batch_size // config.microbatches
    if micro % dp:
        raise ConfigError(f"microbatches={config.microbatches} leaves {micro} sequences per microbatch, not divisible "
                          f"by the data-parallel size ({where}); raise batch_size to a multiple of "
                          f"{dp * config.microbatches} or lower microbatches.")
    if dp % process_count:
        raise ConfigError(f"the data-parallel size ({where}) is not a multiple of the {process_count} processes: "
                          f"each host loads only its own batch rows, so the batch must be split across hosts; "
                          f"raise mesh.data or mesh.fsdp and keep mesh.tensor within one host.")


def check_model(model, sizes: dict[str, int], rules, layout: str) -> None:
    """Every weight dimension a rule splits is divisible by the product of its mesh axes."""
    for name, (field, size) in model_dims(model).items():
        axes = mesh_axes_of(name, rules)
        ways = math.prod(sizes[a] for a in axes)
        if ways > 1 and size % ways:
            hint = {"vocab": " The training loop pads the byte/sentencepiece vocabulary to a multiple of 128, so a "
                             "tensor size dividing 128 always fits.",
                    "kv_heads": " Or keep every key/value head on each tensor shard (each then projects all "
                                "of them; the query heads stay split): --set mesh.rules_override=kv_heads=none."
                    }.get(name, "")
            raise ConfigError(f"{field}={size} is not divisible by {' x '.join(axes)} = {ways} (layout {layout!r} "
                              f"splits '{name}' over {'+'.join(axes)}): choose a mesh size dividing {size}, or "
                              f"change {field.split(' ')[0]}.{hint}")


def check_stages(config, sizes: dict[str, int]) -> None:
    """The pipeline's checks with mesh.stage resolved (it may be -1), and each pipeline microbatch
    splits evenly over data x fsdp like the rest of the batch."""
    check_pipeline(config, sizes["stage"])
    if sizes["stage"] == 1:
        return
    _, _, micro = schedule_of(config.mesh, sizes["stage"])
    rows = config.batch_size // config.microbatches // micro
    dp = math.prod(sizes[a] for a in BATCH_AXES)
    if rows % dp:
        raise ConfigError(f"mesh.pipeline_microbatches={micro} leaves {rows} sequences per pipeline microbatch, not "
                          f"divisible by the data-parallel size (mesh.data x mesh.fsdp = {dp}); lower "
                          f"mesh.pipeline_microbatches or raise batch_size to a multiple of "
                          f"{dp * micro * config.microbatches}.")


def validate_mesh(config, device_count: int, process_count: int = 1) -> dict[str, int]:
    """All mesh errors for a TrainConfig, before compiling; returns the resolved axis sizes."""
    sizes = axis_sizes(config.mesh, device_count)
    rules = rules_for(config.mesh)
    check_dcn_divides(sizes, config.mesh.dcn_data)
    check_batch(config, sizes, process_count)
    check_stages(config, sizes)
    check_model(config.model, sizes, rules, config.mesh.layout)
    check_context_split(config, sizes["context"])  # again with a -1 resolved
    return sizes
