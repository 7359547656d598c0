"""Out of memory, explained in model terms: the largest allocations, what they are, what shrinks them.

Two sources of allocations, both per device:
  state         params, gradients and Adam's two moments of every weight, from its shape,
                its logical axes (model code) and the rule that placed each axis
                (rules.py): 4 x param bytes / shards (gradients live as temporaries
                but have the params' shape and sharding).
  temporaries   the compiler's own buffers: on TPU the out-of-memory message lists the
                "Largest program allocations" (size, op_name, shape); on CPU (no HBM
                limit, so the check is ours) the optimized HLO of the compiled step is
                read for its largest instruction results. Each op_name carries the flax
                module path (".../layers/self_attention/...") and each shape the
                per-device dims, which name the tensor: [.., S, S] attention scores,
                [.., d_ff/t] MLP activations, [.., V/t] logits, a leading L the per-layer
                residuals a scan keeps for the backward pass.
Pure text and shape work: jax only through the abstract parameter tree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
from flax import linen as nn

from matrixmagic.model.build import abstract_variables
from matrixmagic.sharding.mesh import axis_sizes
from matrixmagic.sharding.rules import mesh_axes_of, rules_for, sequence_parallel

from .chips import GiB

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SKIP_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
             "after-all", "partition-id", "replica-id", "iota"}


@dataclasses.dataclass(frozen=True)
class Allocation:
    bytes: float
    shape: str  # e.g. "bf16[4,16,2048,2048]"
    op_name: str
    what: str = ""  # the model term
    knob: str = ""  # what shrinks it


def _dims(shape: str) -> tuple[str, tuple[int, ...]]:
    m = _ARRAY.search(shape)
    if not m:
        return "", ()
    return m[1], tuple(int(d) for d in m[2].split(",") if d)


def array_bytes(shape: str) -> int:
    dtype, dims = _dims(shape)
    return math.prod(dims) * _DTYPE_BYTES.get(dtype, 4) if dtype else 0


def hlo_allocations(text: str, top: int = 40) -> list[Allocation]:
    """The largest instruction results of an optimized HLO module (fusion internals excluded:
    they are not buffers), one per (op_name, shape)."""
    found: dict[tuple[str, str], Allocation] = {}
    fused = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            if line.rstrip().endswith("{") and "(" in line:  # a computation header, not a wrapped attribute
                fused = line.startswith(("%fused", "fused")) or "wrapped_" in line.split("(")[0]
            continue
        m = _INSTR.match(line)
        if fused or not m or m[3] in _SKIP_OPS or m[2].startswith("("):
            continue
        size = array_bytes(m[2])
        op = _OP_NAME.search(line)
        array = _ARRAY.search(m[2])
        key = (op[1] if op else m[1], array[0] if array else m[2])
        if size and (key not in found or found[key].bytes < size):
            found[key] = Allocation(size, key[1], key[0])
    return sorted(found.values(), key=lambda a: -a.bytes)[:top]


def tpu_allocations(message: str) -> list[Allocation]:
    """TPU's "Largest program allocations in hbm": Size / Operator (op_name) / Shape blocks."""
    out = []
    for block in re.split(r"\n\s*\d+\.\s+Size:", "\n" + message)[1:]:
        size = re.match(r"\s*([\d.]+)\s*([KMGT]?)i?B?", block)
        shape = re.search(r"Shape:\s*(\S+)", block)
        op = _OP_NAME.search(block)
        if size:
            scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[size[2].upper()]
            out.append(Allocation(float(size[1]) * scale, shape[1] if shape else "?", op[1] if op else "?"))
    return out


def classify(alloc: Allocation, config, tensor: int = 1) -> Allocation:
    """Name the tensor in model terms (op_name first, then the per-device shape) and the knob."""
    cfg = config.model
    seq = config.data.seq_len
    _, dims = _dims(alloc.shape)
    op, last = alloc.op_name, (dims[-1] if dims else 0)
    stacked = bool(dims) and dims[0] == cfg.num_layers and cfg.scan_layers
    micro = f"--microbatches {config.microbatches * 2} (now {config.microbatches}: halves the rows per pass)"
    remat = "--remat full (keep only each layer's input)" if cfg.remat_policy != "full" else micro
    if len(dims) >= 2 and dims[-1] == dims[-2] == seq:
        what = "attention scores / weights [batch, heads, S, S] (QK^T/sqrt(d_k), softmax)"
        knob = f"--set model.attention_impl=splash on TPU (no S x S matrix in HBM), or {remat}"
    elif "feed_forward" in op or last in (cfg.d_ff, cfg.d_ff // tensor):
        what = f"MLP activations [batch, S, d_ff={cfg.d_ff}] (feed_forward up-projection, GELU)"
        knob = f"{remat}; or a larger mesh tensor (splits d_ff)"
    elif "output_head" in op or "log_softmax" in op or last in (cfg.vocab_size, cfg.vocab_size // tensor):
        what = f"logits [batch, S, vocab={cfg.vocab_size}] and their gradient (output head, loss)"
        knob = f"{micro}; or a larger mesh tensor (splits the vocab)"
    elif re.search(r"(self|cross)_attention/", op):
        what = "attention projections Q/K/V/A.V [batch, S, heads, head_dim]"
        knob = f"{remat}; {micro}"
    elif stacked:
        what = "residual stream [batch, S, d_model] saved per layer"
        knob = f"{remat}; {micro}"
        if not sequence_parallel(config.mesh, tensor):  # Megatron's sequence parallelism splits S over tensor
            knob += ("; or --set mesh.sequence_parallel=true" if tensor > 1 and "tp" in config.mesh.layout else
                     "; or a tensor split (--mesh fsdp=-1,tensor=N): sequence parallelism then splits S N ways")
    else:
        what, knob = "other (embeddings, norms, optimizer update scratch)", micro
    if stacked:
        what += f", for all {cfg.num_layers} layers (the scan keeps it for the backward pass)"
    return dataclasses.replace(alloc, what=what, knob=knob)


def analytic_allocations(config, devices: int) -> list[Allocation]:
    """When the compiler names no buffers (libtpu's compile-only refusal is one line): the largest
    activation terms of the closed-form model (train/planning/plan.py), as per-device shapes. Kept for
    the backward pass across all layers without remat; with remat only one layer's set is live."""
    cfg = config.model
    sizes = axis_sizes(config.mesh, devices)
    t = sizes["tensor"]
    rows = config.batch_size // (sizes["data"] * sizes["fsdp"]) // config.microbatches
    seq, c = config.data.seq_len, _DTYPE_BYTES["bf16" if cfg.dtype == "bfloat16" else "f32"]
    local = seq // sizes.get("context", 1)  # a context split keeps S / C tokens per device (queries: rows of S keys)
    kept = cfg.num_layers if cfg.remat_policy == "none" else 1
    layers = f"{kept},{rows}" if kept > 1 else f"{rows}"
    dtype = "bf16" if c == 2 else "f32"
    out = []
    if cfg.attention_impl == "matrices":  # float32 scores and softmax weights, S x S per head
        out.append(Allocation(kept * rows * cfg.num_heads // t * local * seq * 8,
                              f"f32[{layers},{cfg.num_heads // t},{local},{seq}]", "(analytic) self_attention scores"))
    out.append(Allocation(kept * rows * local * cfg.d_ff // t * c * 2, f"{dtype}[{layers},{local},{cfg.d_ff // t}]",
                          "(analytic) feed_forward hidden + GELU"))
    out.append(Allocation(rows * local * cfg.vocab_size // t * 8, f"f32[{rows},{local},{cfg.vocab_size // t}]",
                          "(analytic) output_head logits + gradient"))
    out.append(Allocation(cfg.num_layers * rows * local * cfg.d_model * c,
                          f"{dtype}[{cfg.num_layers},{rows},{local},{cfg.d_model}]", "(analytic) layer inputs"))
    return sorted(out, key=lambda a: -a.bytes)


@dataclasses.dataclass(frozen=True)
class StateLeaf:
    path: str
    shape: tuple[int, ...]
    logical: tuple
    mesh_axes: tuple
    bytes: float  # per device: params + gradients + 2 Adam moments


def state_leaves(config, devices: int) -> list[StateLeaf]:
    """Per-device params + grads + Adam bytes of each weight, with its logical axes and placement."""
    params = abstract_variables(config.model)["params"]
    specs = nn.get_partition_spec(params)
    sizes = axis_sizes(config.mesh, devices)
    rules = rules_for(config.mesh)
    shapes = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[config.model.param_dtype]
    out = []
    for (path, leaf), spec in zip(shapes, spec_leaves):
        logical = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        axes = tuple(mesh_axes_of(name, rules) if name else () for name in logical)
        shard = math.prod(math.ceil(d / math.prod(sizes[a] for a in ax)) for d, ax in zip(leaf.shape, axes))
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out.append(StateLeaf(name, tuple(leaf.shape), logical, axes, 4 * width * shard))
    return sorted(out, key=lambda s: -s.bytes)


def state_knob(leaf: StateLeaf, config, devices: int) -> str:
    """What splits this weight's state further: the tensor axis for a tensor-rule name left
    whole, else more fsdp ways (the rule table never puts one mesh axis on two dims)."""
    sizes = axis_sizes(config.mesh, devices)
    whole = [n for n, ax in zip(leaf.logical, leaf.mesh_axes) if n and not ax and n != "layers"]
    tensor_names = [n for n in whole if n in ("heads", "mlp", "vocab")]
    if tensor_names and sizes["tensor"] == 1:
        return f"--mesh fsdp=-1,tensor=N (the rule {tensor_names[0]}=tensor then splits '{tensor_names[0]}' N ways)"
    if "fsdp" not in config.mesh.layout:
        return "--layout fsdp (or fsdp+tp): shard params, grads and Adam over the fsdp axis (ZeRO-3)"
    return (f"more fsdp ways (now {sizes['fsdp']}): a larger --topology or a smaller tensor axis; "
            f"whole dims: {', '.join(whole) or 'none'}")


def size_text(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.2f} MiB"


def report_lines(allocations: list[Allocation], config, devices: int, budget: Optional[float],
                 top: int = 6) -> list[str]:
    """The 'what is using the memory' block of an out-of-memory verdict: the compiler's largest
    buffers grouped by model term (largest first), then the optimizer state by weight."""
    tensor = axis_sizes(config.mesh, devices)["tensor"]
    groups: dict[str, list[Allocation]] = {}
    for a in (classify(a, config, tensor) for a in allocations):
        groups.setdefault(a.what, []).append(a)
    lines = ["largest allocations per device, in model terms (grouped; what shrinks each)"]
    for what, group in sorted(groups.items(), key=lambda g: -g[1][0].bytes)[:top]:
        a = group[0]
        more = f" (+{len(group) - 1} more buffers like it)" if len(group) > 1 else ""
        lines.append(f"  {size_text(a.bytes)}  {what}: {a.shape}{more}")
        lines.append(f"  {'':12s}  op {a.op_name[-100:]}")
        lines.append(f"  {'':12s}  -> {a.knob}")
    leaves = state_leaves(config, devices)
    total = sum(s.bytes for s in leaves)
    override = f", override {config.mesh.rules_override}" if config.mesh.rules_override else ""
    lines.append(f"optimizer state (params + gradients + Adam moments): {size_text(total).strip()} per device"
                 + (f", {total / budget:.0%} of the {size_text(budget).strip()} budget" if budget else "")
                 + f"; largest, with each dim's rule (table {config.mesh.layout}{override}):")
    for s in leaves[:3]:
        placed = ", ".join(f"{n}->{'+'.join(ax) or 'whole'}" for n, ax in zip(s.logical, s.mesh_axes) if n)
        lines.append(f"  {size_text(s.bytes)}  {s.path} {list(s.shape)}  ({placed})")
        lines.append(f"  {'':12s}  -> {state_knob(s, config, devices)}")
    return lines
