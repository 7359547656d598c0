"""Where training metrics go: console progress bar, JSONL, TensorBoard, a PNG.

Only process 0 writes files (`enabled=False` elsewhere), so a multi-host run
produces one log, not one per host.
"""

from __future__ import annotations

import json
import os
from typing import Optional

# Measured matmul peak of the 2-core CPU dev machine (float32, ~460 GFLOP/s).
CPU_PEAK_FLOPS = 4.6e11


def default_peak_flops(device_kind: str, platform: str) -> float:
    """Peak FLOP/s of one device for MFU: the chip table where known, else the CPU figure."""
    if platform == "cpu":
        return CPU_PEAK_FLOPS
    try:
        from sharding.chips import peak_flops_for_device_kind

        return peak_flops_for_device_kind(device_kind)
    except (ImportError, KeyError):
        return 0.0


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.history: list[dict] = []
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; tolerate its absence in minimal installs
                self._tb = None

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), int(step))

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(history: list[dict], path: str, title: Optional[str] = None) -> str:
    """Train and eval loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for split, style in (("train", "-"), ("eval", "o-")):
        points = sorted({r["step"]: r["loss"] for r in history if r["split"] == split and "loss" in r}.items())
        if points:
            ax.plot(*zip(*points), style, label=f"{split} loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
