"""Where training metrics go: console progress bar, JSONL, TensorBoard, a PNG.

Only process 0 writes files (`enabled=False` elsewhere), so a multi-host run
produces one log, not one per host.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

from matrixmagic.train.planning.chips import peak_flops_for_device_kind

from . import storage
from .quiet import is_disk_full

METRICS_FILE = "metrics.jsonl"
PEAK_CACHE = "~/.cache/matrixmagic/cpu_matmul_peak.json"
_PROBE_N = 2048  # a 2048^2 f32 matmul: 17 GFLOP, ~0.1 s on a 2-core CPU, large enough to reach the peak


def _cpu_key() -> str:
    """What the probed figure belongs to: the processor, its core count and the jax build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} jax {jax.__version__}"


# What makes a probe "quiet", so its figure may be cached for later runs: its repeats agree
# (the median within QUIET_SPREAD of the best: another process taking the cores mid-probe
# slows some repeats and not others) and the machine was not oversubscribed (1-minute load
# average below its core count: steady competition slows every repeat alike, which the spread
# cannot see). A probe on a busy machine once cached 49.9 GFLOP/s against 170-215 quiet, and
# every later run printed MFU 105-115%.
QUIET_SPREAD = 0.2


@dataclasses.dataclass(frozen=True)
class PeakProbe:
    """One probe of the matmul peak: its best rate and the evidence of whether it was quiet."""

    flops: float  # FLOP/s of the fastest repeat
    spread: float  # median repeat time over the fastest, minus 1
    load: float  # 1-minute load average at the probe (0.0 where the OS has none)
    cores: int

    @property
    def quiet(self) -> bool:
        return not self.noise()

    def noise(self) -> str:
        """Why the probe is not quiet ('' when it is)."""
        if self.spread > QUIET_SPREAD:
            return f"its repeats differ by {self.spread:.0%}"
        if self.load >= self.cores:
            return f"load average {self.load:.1f} on {self.cores} cores"
        return ""


def _matmul_seconds(n: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` jitted n x n float32 matmuls on this host's CPU (compiled first)."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()  # compile
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return seconds


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # no load average on this OS: the spread alone decides
        return 0.0


def probe_cpu_matmul_peak(n: int = _PROBE_N, repeats: int = 5) -> PeakProbe:
    seconds = sorted(_matmul_seconds(n, repeats))
    best, median = seconds[0], seconds[len(seconds) // 2]
    return PeakProbe(2 * n**3 / best, median / best - 1, _load_average(), os.cpu_count() or 1)


def measure_cpu_matmul_peak(n: int = _PROBE_N, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted n x n float32 matmuls on this host's CPU."""
    return probe_cpu_matmul_peak(n, repeats).flops


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):
        return {}


def _cache(probe: PeakProbe) -> bool:
    """Keep a quiet probe's figure for later runs (replacing the one there); True if kept."""
    if not probe.quiet:
        return False
    path = os.path.expanduser(PEAK_CACHE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**_read_cache(path), _cpu_key(): probe.flops}, f)
        os.replace(tmp, path)
    except OSError:
        return False  # a read-only home: measured again next time
    return True


def cpu_matmul_peak(measured: Optional[PeakProbe] = None) -> float:
    """This machine's f32 matmul peak (FLOP/s), measured and cached per processor and jax
    version: CPUs differ too much (~200 vs ~460 GFLOP/s on two boxes of one kind) for a constant.
    Only a quiet probe is cached (`PeakProbe.quiet`); a busy one serves this run alone, and the
    next run probes again. Benchmarks probe in every run and pass theirs as `measured`. 0.0 if it
    cannot be measured, and MFU is then reported as unknown."""
    cached = _read_cache(os.path.expanduser(PEAK_CACHE)).get(_cpu_key())
    if cached and measured is None:
        return float(cached)
    try:
        probe = measured or probe_cpu_matmul_peak()
    except Exception:  # noqa: BLE001 (no CPU backend, out of memory): MFU unknown, never a failed run
        return float(cached or 0.0)
    _cache(probe)
    return probe.flops


_RECHECKED: set[int] = set()  # this process's re-measures (one at most: `recheck_cpu_peak`)


def recheck_cpu_peak(devices, mfu: float, peak: float) -> tuple[float, str]:
    """(per-device peak, log line) after an MFU above 100% on CPU, which says the peak it was
    computed against (a cached probe) is too low: probed again, once per process, the cache
    replaced when the new probe is quiet, and the higher of the two used from now on. (peak, '')
    when there is nothing to do: MFU within 100%, an accelerator, or already re-measured."""
    if mfu <= 1.0 or devices[0].platform != "cpu" or os.getpid() in _RECHECKED:
        return peak, ""
    _RECHECKED.add(os.getpid())
    try:
        probe = probe_cpu_matmul_peak()
    except Exception:  # noqa: BLE001 as cpu_matmul_peak: MFU stays as it was, never a failed run
        return peak, ""
    kept = "cached" if _cache(probe) else f"not cached: {probe.noise() or 'the cache is not writable'}"
    new = max(peak, probe.flops / max(1, len(devices)))
    return new, (f"MFU {mfu:.0%} is above 100%, so the cached CPU matmul peak {peak * len(devices) / 1e9:.1f} "
                 f"GFLOP/s was re-measured: {probe.flops / 1e9:.1f} GFLOP/s ({kept}); MFU {mfu * peak / new:.0%}")


def peak_flops_per_device(devices) -> float:
    """Peak FLOP/s of one device for MFU: the chip table on accelerators (bf16 peak), this
    host's measured matmul peak shared by its CPU devices on CPU; 0.0 when unknown."""
    device = devices[0]
    if device.platform == "cpu":
        return cpu_matmul_peak() / max(1, len(devices))
    try:
        return peak_flops_for_device_kind(device.device_kind)
    except KeyError:
        return 0.0


class _BucketEvents:
    """A TensorBoard events file in a bucket, for tensorboardX: rewritten whole at each flush
    (GCS has no append) through train/storage.py. tensorboardX's own gs:// writer waits 120 s
    per flush on a dead server and flushes again from `__del__` at interpreter exit."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed, self.failed = path, io.BytesIO(), False, False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        """Best effort: events are a view of metrics.jsonl, so a bucket that stopped answering
        costs this run's later events, said once, and never a traceback at exit."""
        if self.failed:
            return
        try:
            storage.retrying(lambda: storage.write_bytes(self.path, self.buffer.getvalue()), self.path)
        except storage.StorageUnavailable as err:
            self.failed = True
            warnings.warn(f"TensorBoard events not written: {err}", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.flush()


class _BucketEventsFactory:
    def open(self, path: str) -> _BucketEvents:
        return _BucketEvents(path)

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no directories to make


class MetricsWriter:
    """metrics.jsonl (one JSON row per log step) and TensorBoard events in the run directory.

    On disk the JSONL file is appended to and flushed row by row. GCS has no append: there the
    rows are kept in memory and the object rewritten whole (it appears atomically), at most every
    FLUSH_SECONDS and at each checkpoint (`flush`) and at close, so the rows up to a committed
    step are in the bucket with it; rows after it are redone by a resume anyway."""

    FLUSH_SECONDS = 30.0

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.history: list[dict] = []
        self._jsonl = None
        self._tb = None
        self._remote = storage.is_remote(workdir)
        self._path = storage.join(workdir, METRICS_FILE)
        self._text, self._flushed = "", time.monotonic()
        if enabled:
            if self._remote:
                self._text = storage.read_text(self._path) if storage.exists(self._path) else ""
            else:
                os.makedirs(workdir, exist_ok=True)
                self._jsonl = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run, closed by close()
            try:
                from tensorboardX import SummaryWriter
                from tensorboardX.record_writer import register_writer_factory

                register_writer_factory("gs", _BucketEventsFactory())
                self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; tolerate its absence in minimal installs
                self._tb = None

    def _row(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if not self._remote:
            assert self._jsonl is not None  # rows are written only when enabled, and then __init__ opened it
            self._jsonl.write(line)
            self._jsonl.flush()
            return
        self._text += line
        if time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """The rows written so far are in the run directory (a no-op on disk, where each row is)."""
        if self.enabled and self._remote:
            storage.retrying(lambda: storage.write_text(self._path, self._text), f"workdir={self.workdir!r}")
            self._flushed = time.monotonic()

    def write(self, step: int, split: str, values: dict) -> None:
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        self._row(record)
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(f"{split}/{key}", float(value), int(step))

    def record(self, step: int, split: str, fields: dict) -> None:
        """A row of facts rather than numbers (a resume's allowed changes): JSONL only."""
        if self.enabled:
            self._row({"step": int(step), "split": split, **fields})

    def close(self) -> None:
        """Best effort on a full disk or a bucket that stopped answering: the rows up to the last
        checkpoint are already written (a resume redoes the rest), and the failure is reported
        once, by whoever hit it first (train/loop.py, train/checkpoint.py)."""
        for close in (self.flush, *(h.close for h in (self._jsonl, self._tb) if h is not None)):
            try:
                close()
            except storage.StorageUnavailable:
                pass
            except OSError as err:
                if not is_disk_full(err):
                    raise


def read_history(workdir: str) -> list[dict]:
    path = storage.join(workdir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
    return path
