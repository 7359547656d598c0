"""Pictures of the matrices: attention weights per head, positional encodings, the mask.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no
display), so plotting works on headless machines and in tests.

A picture is rendered to PNG bytes in memory and then written, so the destination may be
a local path or a `gs://` URL (`magic explain --plot gs://bucket/plots` on a pod with no
shared disk): `write(path, data)` is the caller's writer (the CLI's storage layer), and by
default a URL goes through etils epath, the path library orbax and TFDS use, because
model/ does not import train/. A URL is never handed to pathlib, which would turn it into
a local folder named `gs:`.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .families import family_of
from .positional import positional_kind

MAX_LABELED_TOKENS = 48  # beyond this, tick labels overlap: show every k-th
Writer = Callable[[str, bytes], None]
Where = Union[str, Path]


def _is_url(path: Where) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)))


def _child(folder: Where, name: str) -> Where:
    return f"{str(folder).rstrip('/')}/{name}" if _is_url(folder) else Path(folder) / name


def write_file(path: Where, data: bytes) -> None:
    """The default writer: a local file (its folder made), or a URL through etils epath."""
    if _is_url(path):
        from etils import epath

        epath.Path(str(path)).write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _save(fig: Figure, path: Where, write: Optional[Writer] = None) -> Where:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    (write or write_file)(str(path), buffer.getvalue())
    return path if _is_url(path) else Path(path)


def _label_axes(ax, labels: Optional[Sequence[str]], rows: int, cols: int, col_labels=None):
    col_labels = labels if col_labels is None else col_labels
    for axis, n, names in ((ax.xaxis, cols, col_labels), (ax.yaxis, rows, labels)):
        if names is None:
            continue
        step = max(1, math.ceil(n / MAX_LABELED_TOKENS))
        ticks = list(range(0, n, step))
        axis.set_ticks(ticks)
        axis.set_ticklabels([names[i] for i in ticks], fontsize=7, fontfamily="monospace")
    ax.tick_params(axis="x", labelrotation=90)


def plot_attention(weights: np.ndarray, labels: Optional[Sequence[str]], path, title: str = "",
                   key_labels: Optional[Sequence[str]] = None, write: Optional[Writer] = None) -> Where:
    """weights [H, Tq, Tk] (one layer, one sequence): one heat map per head, queries down, keys across."""
    weights = np.asarray(weights, np.float32)
    heads, tq, tk = weights.shape
    cols = min(4, heads)
    rows = math.ceil(heads / cols)
    side = max(3.0, min(6.0, 0.16 * max(tq, tk) + 1.5))
    fig = Figure(figsize=(side * cols + 1, side * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        _label_axes(ax, labels, tq, tk, key_labels)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="softmax weight")
    fig.suptitle(title or "attention weights A = softmax(Q K^T / sqrt(d_k))", fontsize=11)
    return _save(fig, path, write)


def positional_picture(explanation, positions: int = 256, dims: int = 512
                       ) -> Optional[tuple[np.ndarray, str, str]]:
    """(table [positions, dims], x label, title) of the model's own positional encodings, or None:
    the sinusoidal table of Vaswani et al. 3.5 for a sinusoidal model; for learned positions the
    rows P[pos] its forward pass used (none in a shape-only walk: a random table says nothing)."""
    cfg = explanation.config
    kind = positional_kind(cfg)
    if kind.fixed_table is not None:
        return (kind.fixed_table(cfg)[:positions, :dims], kind.table_axis,
                kind.table_title.format(d_model=cfg.d_model, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta))
    if explanation.shapes_only:
        return None
    table = np.asarray(explanation.stage("positional encodings").value)
    table = table[0] if table.ndim == 3 else table  # [B, T, d]: the first sequence's positions
    return (table[:positions, :dims], "embedding dimension i",
            (f"learned position embeddings P[pos, i] of this model, positions 0..{min(positions, len(table)) - 1}, "
             f"d_model={cfg.d_model}"))


def plot_positional_encoding(table: np.ndarray, xlabel: str, title: str, path,
                             write: Optional[Writer] = None) -> Where:
    table = np.asarray(table, np.float32)
    limit = float(np.abs(table).max()) or 1.0  # sinusoids fill [-1, 1]; a learned table is ~init_std wide
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    image = ax.imshow(table, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("position")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    return _save(fig, path, write)


def plot_mask(mask: np.ndarray, labels: Optional[Sequence[str]], path, title: str = "",
              write: Optional[Writer] = None) -> Where:
    """mask [Tq, Tk] bool: white where a query may attend a key."""
    mask = np.asarray(mask, bool)
    side = max(3.5, min(8.0, 0.16 * mask.shape[0] + 2))
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    ax.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _label_axes(ax, labels, *mask.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or "attention mask (white = may attend)")
    return _save(fig, path, write)


def plot_explanation(explanation, out_dir, labels: Optional[Sequence[str]] = None,
                     write: Optional[Writer] = None) -> list[Where]:
    """The three pictures of a `model.explain.Explanation`: attention per head for its layer
    (first sequence), the model's positional encodings (`positional_picture`), and the
    self-attention mask. `out_dir`: a local folder or a URL; `write`: see the module docstring."""
    cfg, layer = explanation.config, explanation.layer
    picture = positional_picture(explanation)
    written = [plot_positional_encoding(*picture, _child(out_dir, "positional_encoding.png"), write)] \
        if picture else []
    if explanation.shapes_only:
        return written  # no values to draw
    labels = labels or explanation.labels
    weights = explanation.stage("attention weights").value[0]
    written.append(plot_attention(weights, labels, _child(out_dir, f"attention_layer{layer}.png"),
                                  f"layer {layer} self-attention weights, {weights.shape[0]} heads", write=write))
    mask = explanation.stage("mask").value[0, 0]
    causal = family_of(cfg).causal
    name = "causal_mask.png" if causal else "attention_mask.png"
    written.append(plot_mask(mask, labels, _child(out_dir, name),
                             "causal mask: query t sees keys <= t" if causal
                             else "bidirectional: every query sees every key", write))
    return written
