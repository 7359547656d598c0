"""Data mixtures: which source each row of the stream comes from, as a pure function of (seed, position).

Stream position i (a row slot of the global batch stream, pipeline.py) draws a uniform number from
a hash of (seed, i) and takes source j with probability w_j / sum(w). The k-th row drawn from
source j is position k of j's own shuffled stream (pipeline.py `source_positions`: the count of
j's draws before the step, plus its rank within the step), so each source is read in its own
order without repeats within an epoch, and nothing depends on state carried between steps: a
resume at any step, or a run on another number of hosts, draws the same rows (every host
computes the draws of its step and keeps its own slots).

Why a hash and not a sampler with state: a stateful sampler would have to be checkpointed and
replayed, and two hosts would have to agree on its state; splitmix64 (Steele, Lea and Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014) of (key + i) is one vectorized
numpy expression, and its outputs pass BigCrush, so the weights hold over any window of rows.
"""

from __future__ import annotations

import hashlib

import numpy as np

COUNT_CHUNK = 1 << 20  # positions hashed at once when counting rows per source


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Mixture:
    """Sources `names` with `weights` (any scale; normalized here) under `seed`."""

    def __init__(self, names: list[str], weights: list[float], seed: int):
        self.names, self.seed = list(names), int(seed)
        total = float(sum(weights))
        self.weights = np.asarray(weights, np.float64) / total
        self.bounds = np.cumsum(self.weights)[:-1]
        self.key = np.uint64(int.from_bytes(hashlib.sha256(f"mixture:{seed}".encode()).digest()[:8], "big"))
        self._counted, self._counts = 0, np.zeros(len(names), np.int64)

    def source_of(self, positions: np.ndarray) -> np.ndarray:
        """Source index of each stream position (>= 0)."""
        with np.errstate(over="ignore"):
            bits = _splitmix64(np.asarray(positions, np.uint64) + self.key)
        uniform = (bits >> np.uint64(11)).astype(np.float64) / 2.0**53
        return np.searchsorted(self.bounds, uniform, side="right")

    def rows_before(self, n: int) -> np.ndarray:
        """How many of stream positions [0, n) each source supplies. Counted on from the last
        call (a run asks at increasing steps), from 0 after a step back (a resume)."""
        if n < self._counted:
            self._counted, self._counts = 0, np.zeros(len(self.names), np.int64)
        for start in range(self._counted, n, COUNT_CHUNK):
            chosen = self.source_of(np.arange(start, min(start + COUNT_CHUNK, n), dtype=np.uint64))
            self._counts += np.bincount(chosen, minlength=len(self.names))
        self._counted = max(self._counted, n)
        return self._counts.copy()

    def describe(self) -> str:
        return ",".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights))
