"""Per-channel feature statistics (count, mean, sum of squared deviations), exact to merge across work chunks
and MPI ranks.

Each chunk computes :meth:`FeatureStats.from_features` in float64 (two-pass: mean, then squared deviations);
chunks merge with Chan, Golub & LeVeque's pairwise update

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n

so the result equals the statistics of the concatenated frames up to float64 rounding, whatever the order
or partition. :meth:`merge_all` reduces as a balanced tree, keeping the rounding error at O(log chunks).
``to_dict``/``from_dict`` store the float64 values as JSON numbers, which Python writes with ``repr`` (the
shortest string that parses back to the same double), so a manifest round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np


def _vector(name: str, value, n: int | None = None) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)  # a copy: the instance must not share a caller's buffer
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} channels, expected {n}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Statistics of ``count`` frames: per-channel ``mean`` and ``m2`` (sum of squared deviations from the mean),
    float64. The empty value (``count == 0``) is the identity of :meth:`merge`; it may have no channels."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        count = int(self.count)
        if count != self.count or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        mean = _vector("mean", self.mean)
        m2 = _vector("m2", self.m2, mean.shape[0])
        if np.any(m2 < 0):
            raise ValueError("m2 must be >= 0")
        if count == 0 and (np.any(mean != 0) or np.any(m2 != 0)):
            raise ValueError("empty statistics must have zero mean and m2")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def empty(cls, n_channels: int = 0) -> "FeatureStats":
        """No frames: ``merge``'s identity (with 0 channels it merges with statistics of any width)."""
        return cls(0, np.zeros(n_channels), np.zeros(n_channels))

    @classmethod
    def from_features(cls, x: np.ndarray) -> "FeatureStats":
        """Statistics of the frames of ``x`` ``[T, C]`` (any float dtype, float16 included), computed in float64."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"features must be [frames, channels], got shape {x.shape}")
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("features have non-finite values")
        mean = x.mean(axis=0)
        d = x - mean
        return cls(x.shape[0], mean, np.einsum("tc,tc->c", d, d))

    # -- combination --------------------------------------------------------------------------------------

    @property
    def n_channels(self) -> int:
        return self.mean.shape[0]

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Statistics of both sets of frames."""
        if other.count == 0 and other.n_channels in (0, self.n_channels):
            return self
        if self.count == 0 and self.n_channels in (0, other.n_channels):
            return other
        if self.n_channels != other.n_channels:
            raise ValueError(f"cannot merge statistics of {self.n_channels} and {other.n_channels} channels")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return FeatureStats(n, mean, m2)

    @classmethod
    def merge_all(cls, stats: Iterable["FeatureStats"]) -> "FeatureStats":
        """Merge any number of statistics (a balanced tree of :meth:`merge`); none gives :meth:`empty`."""
        level = list(stats)
        if not level:
            return cls.empty()
        while len(level) > 1:
            level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
        return level[0]

    # -- results ------------------------------------------------------------------------------------------

    @property
    def variance(self) -> np.ndarray:
        """Population variance per channel (numpy's ``var``, ``ddof=0``)."""
        if self.count == 0:
            raise ValueError("variance of no frames")
        return self.m2 / self.count

    def std(self, floor: float = 1e-6) -> np.ndarray:
        """Standard deviation per channel, at least ``floor`` (so constant channels can still be divided by)."""
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        return np.maximum(np.sqrt(self.variance), floor)

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe: ``{"count": int, "mean": [float], "m2": [float]}``; floats round-trip exactly."""
        return {"count": self.count, "mean": [float(v) for v in self.mean], "m2": [float(v) for v in self.m2]}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        if set(d) != {"count", "mean", "m2"}:
            raise ValueError(f"feature statistics need keys count, mean, m2; got {sorted(d)}")
        return cls(d["count"], d["mean"], d["m2"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        return self.count == other.count and np.array_equal(self.mean, other.mean) and np.array_equal(self.m2, other.m2)

    __hash__ = None  # type: ignore[assignment]
