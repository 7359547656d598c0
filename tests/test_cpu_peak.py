"""The CPU matmul peak behind MFU on CPU (train/metrics.py): only a quiet probe is cached, and
an MFU above 100% against the cached figure probes again, once per process, replacing it.

The probe's timings and the load average are replaced here: what is tested is the decision,
never a wall clock."""

from __future__ import annotations

import json

import jax
import pytest

from matrixmagic.train import metrics

N = metrics._PROBE_N
FLOP = 2 * N**3  # of one probe matmul


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """The cache in tmp_path, a quiet machine (load 0), and probe timings set by the test:
    `probe.seconds` is what each probe times; `probe.calls` counts the probes."""
    monkeypatch.setattr(metrics, "PEAK_CACHE", str(tmp_path / "cache" / "peak.json"))
    monkeypatch.setattr(metrics, "_load_average", lambda: 0.0)
    monkeypatch.setattr(metrics, "_RECHECKED", set())

    class Probe:
        seconds = [0.1] * 5
        calls = 0

        def cached(self):
            path = tmp_path / "cache" / "peak.json"
            return json.loads(path.read_text()).get(metrics._cpu_key()) if path.exists() else None

    state = Probe()

    def timings(n, repeats):
        state.calls += 1
        return list(state.seconds)

    monkeypatch.setattr(metrics, "_matmul_seconds", timings)
    return state


def test_a_quiet_probe_is_cached_and_read_back_without_probing_again(probe):
    probe.seconds = [0.1, 0.105, 0.11, 0.1, 0.102]  # repeats within 10%
    assert metrics.cpu_matmul_peak() == pytest.approx(FLOP / 0.1)
    assert probe.cached() == pytest.approx(FLOP / 0.1)
    assert metrics.cpu_matmul_peak() == pytest.approx(FLOP / 0.1) and probe.calls == 1


def test_a_probe_whose_repeats_disagree_serves_this_run_and_is_not_cached(probe):
    probe.seconds = [0.1, 0.3, 0.35, 0.4, 0.5]  # another process took the cores mid-probe
    assert metrics.cpu_matmul_peak() == pytest.approx(FLOP / 0.1)
    assert probe.cached() is None
    metrics.cpu_matmul_peak()
    assert probe.calls == 2  # the next run probes again


def test_a_probe_on_an_oversubscribed_machine_is_not_cached(probe, monkeypatch):
    monkeypatch.setattr(metrics, "_load_average", lambda: 2.0 * (metrics.os.cpu_count() or 1))
    metrics.cpu_matmul_peak()
    assert probe.cached() is None
    assert "load average" in metrics.probe_cpu_matmul_peak().noise()


def test_an_mfu_above_100_percent_probes_again_once_and_replaces_the_cache(probe):
    devices = jax.local_devices()
    probe.seconds = [0.4] * 5  # the figure a busy machine once left in the cache ...
    metrics.cpu_matmul_peak()
    low = metrics.peak_flops_per_device(devices)
    assert probe.cached() == pytest.approx(FLOP / 0.4)
    assert metrics.recheck_cpu_peak(devices, 0.9, low) == (low, "") and probe.calls == 1  # within 100%: nothing

    probe.seconds = [0.1] * 5  # ... and the quiet machine's
    peak, note = metrics.recheck_cpu_peak(devices, 1.1, low)
    assert probe.calls == 2 and peak == pytest.approx(FLOP / 0.1 / len(devices))
    assert probe.cached() == pytest.approx(FLOP / 0.1)
    assert note == (f"MFU 110% is above 100%, so the cached CPU matmul peak {FLOP / 0.4 / 1e9:.1f} GFLOP/s was "
                    f"re-measured: {FLOP / 0.1 / 1e9:.1f} GFLOP/s (cached); MFU 28%")

    assert metrics.recheck_cpu_peak(devices, 1.5, peak) == (peak, "")  # once per process
    assert probe.calls == 2


def test_a_noisy_re_measure_serves_the_run_but_leaves_the_cache(probe):
    devices = jax.local_devices()
    probe.seconds = [0.4] * 5
    metrics.cpu_matmul_peak()
    low = metrics.peak_flops_per_device(devices)
    probe.seconds = [0.1, 0.3, 0.35, 0.4, 0.5]
    peak, note = metrics.recheck_cpu_peak(devices, 1.2, low)
    assert peak == pytest.approx(FLOP / 0.1 / len(devices)) and "not cached: its repeats differ by" in note
    assert probe.cached() == pytest.approx(FLOP / 0.4)


@pytest.mark.slow
def test_a_train_run_against_a_too_low_cached_peak_says_so_once_and_logs_the_mfu_against_the_new_one(
        probe, tmp_path, monkeypatch, capsys):
    """The loop (train/loop.py): the first log step's MFU above 100% re-measures, says so in one
    line, and every row in metrics.jsonl is against the new peak."""
    from run_helpers import TINY, write_corpus

    from matrixmagic.train.cli import main

    probe.seconds = [1e3] * 5  # a cached peak of a few MFLOP/s: any step is "above 100%"
    metrics.cpu_matmul_peak()
    probe.seconds = [1e-9] * 5
    monkeypatch.chdir(tmp_path)
    sets = [*TINY, "steps=3", f"data.source={write_corpus(tmp_path / 'corpus')}",
            f"data.data_dir={tmp_path / 'data'}", f"workdir={tmp_path / 'run'}"]
    assert main(["train", *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert out.count("was re-measured") == 1 and probe.calls == 2, out
    assert probe.cached() == pytest.approx(FLOP / 1e-9)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mfu"] < 1 for r in rows if r["split"] == "train"] == [True] * 3
