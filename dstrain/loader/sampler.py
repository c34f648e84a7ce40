"""Epoch planning for synchronous data-parallel training: which rank reads which samples, in which batch, at which step.

Everything here is pure and deterministic (numpy only: no TensorFlow, no I/O, no Horovod). ``rank`` and ``world``
are arguments, so every rank computes every other rank's plan alike, and a plan can be recomputed after a restart.

Vocabulary
----------
* A **row group** (:class:`RowGroup`) is the unit of reading of a Parquet shard: a key chosen by the caller, the
  frame count of each of its rows and the store it comes from.
* A **sample** is ``(row group key, row index)``; its **sample id** is ``offset of its row group + row`` where the
  offsets follow the order of the ``row_groups`` sequence given (so ids are stable as long as the caller lists stores,
  shards and row groups in the same order, e.g. ``--train_files`` order, manifest order, file order).
* An epoch's **pool** is the list of sample draws of that epoch (each sample once, unless store weights upsample a
  store); a draw's index in the pool (``EpochPlan.entries``) is unique even where sample ids repeat.
* A **step** is one training step: every rank runs one batch per step, in lockstep (allreduce).

Training plan (:func:`plan_epoch`)
----------------------------------
1. *Pool*: ``limit`` keeps a fixed prefix of the data (see :func:`plan_epoch`), ``weights`` resample stores; then one
   permutation of row groups, seeded by ``(seed, epoch)`` and shared by all ranks, orders the pool (rows are shuffled
   within each row group).
2. *Partition*: rank ``r`` takes the ``r``-th of ``world`` contiguous runs of that order, sized
   ``floor(P/world)`` or ``ceil(P/world)``. So ranks own disjoint sets of whole row groups; a row group straddling a
   boundary between two ranks (and, with fewer row groups than ranks or one huge row group, the row groups shared out)
   is split by rows. Per-rank totals differ by **at most one row**; each rank holds at most two partial row groups, and
   at most ``world - 1`` row groups are read by more than one rank.
3. *Steps*: every rank runs exactly ``S`` steps of exactly ``batch_size`` samples. ``remainder="drop"``:
   ``S = floor(floor(P/world) / B)``, each rank drops at most ``B`` of its own samples (chosen at random in its last
   window). ``remainder="pad"``: ``S = ceil(ceil(P/world) / B)``, each rank repeats at most ``B`` of its own samples
   (from its last window, cycled if it has fewer); only a rank with no sample at all (fewer samples than ranks) borrows
   from the pool. Whole shards or row groups are never repeated, and no rank ever has an extra step.
4. *Windows (shuffle buffer)*: steps are grouped in windows of ``Sw = max(1, K * mean_rows_per_row_group // B)`` steps,
   identical on all ranks; window ``w`` of a rank holds the samples ``[w*Sw*B, (w+1)*Sw*B)`` of its run, i.e. about
   ``K = window_row_groups`` consecutive row groups (+1 at the edges). Samples are mixed only within a window, so a
   streaming reader needs just the window's row groups (``EpochPlan.windows`` / :meth:`EpochPlan.resident`), and can
   prefetch the next window's.
5. *Buckets*: bucket boundaries are quantiles of the frame counts of all samples (after ``limit``), identical on all
   ranks. Within a window each rank sorts its samples by (bucket, random), cuts them into ``Sw`` batches (batch ``j`` is
   the ``j``-th length quantile of the window; only a batch on a bucket boundary mixes two adjacent buckets), then one
   permutation shared by all ranks orders the window's steps: at every step all ranks run their batch of the same
   length quantile, so no rank waits on a long batch while the others run short ones.
6. *Length-ordered epochs* (``sortagrad``: epoch 0 shortest first; ``reverse``: longest first): the rank's whole run is
   one window, sorted by exact length; step ``s`` is each rank's ``s``-th shortest (longest) batch. Ranks stay balanced
   step by step, but the window is the rank's whole share (a reader holds or re-reads its 1/world of the data).
7. *Duration batches* (``batch_frames = N`` instead of ``batch_size``): a batch holds as many samples as fit in ``N``
   frames of padded batch tensor (samples x longest sample <= N), so short samples come many to a batch and long ones
   few. Steps 1-2 are unchanged; then every rank keeps exactly ``n`` samples (drop: ``floor(P/world)``, a rank with
   one more leaves out a random one of its last window; pad: ``ceil(P/world)``, a rank with one fewer repeats one of
   its own). Windows are ``K * mean_rows_per_row_group`` samples (the same residency as fixed batches). Every rank can
   compute every other rank's windows from the shared pool order; each sorts its window by (bucket, random) as in 5,
   so position ``i`` is the same length quantile on every rank, and batches are cut at the same positions on all
   ranks, greedily, along the longest sample *any* rank has at each position: every rank's batch fits ``N``, all
   ranks run the same number of steps (window by window), and at each step the same number of samples of the same
   length quantile. One shared permutation orders each window's steps, as in 5. A sample longer than ``N`` is an
   error (it could never fit). Planning costs one sort of the whole pool whatever the world size.

Steps 2-7 are one engine for both kinds of batch; a :class:`BatchRule` (:class:`FixedBatchSize` for ``batch_size``,
:class:`FrameBudget` for ``batch_frames``, as Lhotse's sampling constraints) says only how many samples every rank
keeps (``S * B``, or ``n``), how many a window holds (``Sw * B``, or ``K * mean_rows_per_row_group``) and where a
window's batches end (every ``B``, or greedily along the budget). With fixed batches the cuts need no other rank's
samples, so a rank plans its own share only.

Evaluation plan (:func:`plan_eval`): contiguous runs of the data in its natural order, every sample exactly once over
all ranks, no padding or dropping; ranks may differ by one step (or have none at all).

Resume (:class:`LoaderPosition`, :func:`resume_plan`): see there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np

SampleRef = tuple[int, int]
"""``(row group key, row index)``."""
Remainder = Literal["drop", "pad"]
Buckets = Union[int, Sequence[float]]

DEFAULT_BUCKETS = 30  # as Lhotse's bucketing samplers
DEFAULT_WINDOW_ROW_GROUPS = 8
POSITION_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True, eq=False)
class RowGroup:
    """One Parquet row group: ``key`` (any int, unique over the input), per-row ``n_frames``, and its ``store``
    (index into ``weights`` when mixing several stores; 0 for a single store)."""

    key: int
    n_frames: np.ndarray
    store: int = 0

    def __post_init__(self) -> None:
        frames = np.asarray(self.n_frames)
        if frames.ndim != 1:
            raise ValueError(f"row group {self.key}: n_frames must be 1-D, got shape {frames.shape}")
        if frames.size and frames.min() < 0:
            raise ValueError(f"row group {self.key}: negative frame count")
        object.__setattr__(self, "n_frames", frames.astype(np.int64, copy=False))
        object.__setattr__(self, "key", int(self.key))
        object.__setattr__(self, "store", int(self.store))
        if self.store < 0:
            raise ValueError(f"row group {self.key}: negative store {self.store}")

    @property
    def rows(self) -> int:
        return int(self.n_frames.size)


class RowGroupTable:
    """Row groups flattened into arrays (build it once and pass it instead of the list to save the concatenation).

    ``sample id = offsets[i] + row`` for the ``i``-th row group of the sequence given.
    """

    def __init__(self, row_groups: Sequence[RowGroup]):
        self.keys = np.array([g.key for g in row_groups], dtype=np.int64)
        self.stores = np.array([g.store for g in row_groups], dtype=np.int64)
        self.sizes = np.array([g.rows for g in row_groups], dtype=np.int64)
        if np.unique(self.keys).size != self.keys.size:
            raise ValueError("row group keys must be unique")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n_frames = (
            np.concatenate([g.n_frames for g in row_groups]) if row_groups else np.zeros(0, np.int64)
        ).astype(np.int64, copy=False)
        self.rg_index = np.repeat(np.arange(len(row_groups), dtype=np.int64), self.sizes)
        self._index_of_key = {int(k): i for i, k in enumerate(self.keys)}
        self._digest: Optional[str] = None

    @property
    def n_samples(self) -> int:
        return int(self.n_frames.size)

    @property
    def n_row_groups(self) -> int:
        return int(self.keys.size)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids -> (row group keys, row indices)."""
        ids = np.asarray(ids, dtype=np.int64)
        rg = self.rg_index[ids]
        return self.keys[rg], ids - self.offsets[rg]

    def sample_id(self, key: int, row: int) -> int:
        i = self._index_of_key[int(key)]
        if not 0 <= row < self.sizes[i]:
            raise IndexError(f"row {row} outside row group {key} of {self.sizes[i]} rows")
        return int(self.offsets[i] + row)

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            for a in (self.keys, self.stores, self.sizes, self.n_frames):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            self._digest = h.hexdigest()
        return self._digest


def make_row_groups(
    n_frames: Sequence[Sequence[int]], stores: Optional[Sequence[int]] = None, first_key: int = 0
) -> list[RowGroup]:
    """Row groups keyed ``first_key, first_key + 1, ...`` from per-row-group frame counts."""
    stores = [0] * len(n_frames) if stores is None else list(stores)
    if len(stores) != len(n_frames):
        raise ValueError("one store per row group")
    return [RowGroup(first_key + i, np.asarray(f, dtype=np.int64), s) for i, (f, s) in enumerate(zip(n_frames, stores))]


RowGroups = Union[RowGroupTable, Sequence[RowGroup]]


def _as_table(row_groups: RowGroups) -> RowGroupTable:
    return row_groups if isinstance(row_groups, RowGroupTable) else RowGroupTable(list(row_groups))


@dataclass(frozen=True)
class PlanSpec:
    """How epochs are planned: everything but the world (rank, size), the epoch and the seed. See :func:`plan_epoch`
    for what each setting guarantees."""

    batch_size: int
    """Samples per step on each rank (0 with ``batch_frames``)."""
    shuffle: bool = True
    """One shared permutation of row groups per (seed, epoch); False: input order, no buckets."""
    sortagrad: bool = False
    """Epoch 0 (every epoch without shuffle) in order of length, shortest first."""
    reverse: bool = False
    """Length-ordered epochs longest first (implies ordering epoch 0)."""
    limit: int = 0
    """At most this many samples (a fixed subset); 0: all."""
    buckets: Buckets = DEFAULT_BUCKETS
    """A count of frame-count quantile buckets, or explicit boundaries; <= 1: none."""
    window_row_groups: int = DEFAULT_WINDOW_ROW_GROUPS
    """Row groups per shuffle window (<= 0: a rank's whole share)."""
    remainder: Remainder = "drop"
    """What happens to the samples that do not fill a rank's last batch: ``drop`` or ``pad``."""
    weights: Optional[tuple[float, ...]] = None
    """Mixing weight per store (``RowGroup.store``); None: each sample once."""
    batch_frames: int = 0
    """Duration batches: at most this many frames in a rank's padded batch (samples x longest sample), as many
    samples as fit; ``batch_size`` must then be 0. 0: fixed ``batch_size``."""

    def __post_init__(self) -> None:
        if self.batch_frames < 0:
            raise ValueError(f"batch_frames must be >= 0, not {self.batch_frames}")
        if self.batch_frames and self.batch_size:
            raise ValueError(f"give batch_size ({self.batch_size}) or batch_frames ({self.batch_frames}), not both")
        if not self.batch_frames and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {self.batch_size}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', not {self.remainder!r}")
        if not isinstance(self.buckets, (int, np.integer)):
            object.__setattr__(self, "buckets", tuple(float(b) for b in self.buckets))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @property
    def batch_rule(self) -> "BatchRule":
        return _batch_rule(self.batch_size, self.batch_frames)


# ----------------------------------------------------------------------------------------------------------------------
# Batch rules


class BatchRule:
    """What ends a batch: a fixed count (:class:`FixedBatchSize`) or a frame budget (:class:`FrameBudget`), as Lhotse's
    sampling constraints are passed to one sampler. The rank split, the remainder rule, windows, buckets and the shared
    step order are one engine for both; a rule says how many entries every rank keeps, how long a window is and where
    a window's batches end."""

    shares_cuts: bool = False
    """Batch ends depend on every rank's samples, so all ranks are planned together (and draw their random tie-breaks
    from one stream: see :func:`_tie_keys`)."""
    drops_earliest_tie: bool = False
    """Which of equal tie-breaks the drop remainder leaves out: the earliest sample, or the latest (as each rule did
    when existing checkpoints were planned)."""

    @property
    def pad_from_latest(self) -> int:
        """A rank whose last window is empty repeats (some of) its latest this many samples."""
        return 1

    def kept(self, dealt: int, remainder: Remainder) -> int:
        """Entries every rank keeps, from ``dealt``: the fewest samples a rank was dealt (drop), or the most (pad)."""
        raise NotImplementedError

    def window(self, kept: int, span: Optional[int]) -> int:
        """Entries per window, for windows of about ``span`` samples (None: the rank's whole run)."""
        raise NotImplementedError

    def cuts(self, lengths: np.ndarray, window: int) -> np.ndarray:
        """Batch boundaries ``0..kept`` over every planned rank's window-sorted lengths (ranks x kept), never across a
        window."""
        raise NotImplementedError

    def check_lengths(self, lengths: np.ndarray) -> None:
        """Raise if a sample can never be batched."""


@dataclass(frozen=True)
class FixedBatchSize(BatchRule):
    """``batch_size`` samples per batch; windows are whole numbers of steps."""

    batch_size: int

    @property
    def pad_from_latest(self) -> int:
        return self.batch_size

    def kept(self, dealt: int, remainder: Remainder) -> int:
        steps = dealt // self.batch_size if remainder == "drop" else -(-dealt // self.batch_size)
        return steps * self.batch_size

    def window(self, kept: int, span: Optional[int]) -> int:
        steps = kept // self.batch_size
        return self.batch_size * (max(1, steps) if span is None else max(1, min(steps, span // self.batch_size)))

    def cuts(self, lengths: np.ndarray, window: int) -> np.ndarray:
        return np.arange(0, lengths.shape[1] + 1, self.batch_size, dtype=np.int64)


@dataclass(frozen=True)
class FrameBudget(BatchRule):
    """As many samples per batch as fit ``batch_frames`` frames of padded batch (samples x longest), cut along the
    longest sample any rank has at each position, so every rank's batch fits and all ranks run the same steps."""

    batch_frames: int
    shares_cuts = True
    drops_earliest_tie = True

    def kept(self, dealt: int, remainder: Remainder) -> int:
        return dealt

    def window(self, kept: int, span: Optional[int]) -> int:
        return kept if span is None else max(1, min(kept, span))

    def cuts(self, lengths: np.ndarray, window: int) -> np.ndarray:
        return _greedy_cuts(lengths.max(axis=0), self.batch_frames, window)

    def check_lengths(self, lengths: np.ndarray) -> None:
        over = lengths > self.batch_frames
        if over.any():
            raise ValueError(
                f"batch_frames {self.batch_frames}: {int(over.sum())} sample(s) are longer, the longest "
                f"{int(lengths.max())} frames; raise batch_frames to at least {int(lengths.max())}, or leave long "
                f"samples out when preprocessing"
            )


def _batch_rule(batch_size: int, batch_frames: int) -> BatchRule:
    return FrameBudget(batch_frames) if batch_frames else FixedBatchSize(batch_size)


# ----------------------------------------------------------------------------------------------------------------------
# Plans and positions


@dataclass(frozen=True)
class Window:
    """Steps ``[start, stop)`` of a plan (plan-relative) and the row groups they read: keep them resident meanwhile."""

    start: int
    stop: int
    keys: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch run with one layout: ``steps`` steps at ``world`` ranks of ``batch_size`` samples (or of
    duration batches of at most ``batch_frames`` padded frames, ``batch_size`` 0)."""

    world: int
    batch_size: int
    window_row_groups: int
    steps: int
    batch_frames: int = 0

    @property
    def layout(self) -> tuple[int, int, int, int]:
        return (self.world, self.batch_size, self.window_row_groups, self.batch_frames)

    @property
    def batch_rule(self) -> BatchRule:
        return _batch_rule(self.batch_size, self.batch_frames)

    def __str__(self) -> str:
        batches = f"batches of {self.batch_frames} frames" if self.batch_frames else f"batch {self.batch_size}"
        return f"world {self.world} x {batches} for {self.steps} steps"


@dataclass(frozen=True)
class LoaderPosition:
    """Where training stands in an epoch; JSON-safe via :meth:`to_dict` for checkpoints.

    ``segments`` lists the layouts the epoch ran under, in order (a new one each time the world size, batch size,
    frame budget or window changed), each with the steps it ran; a segment of duration batches carries
    ``batch_frames`` (absent from the JSON of fixed ones, whose positions read as before). ``fingerprint`` identifies
    the data and the loader settings that must stay the same within an epoch ("" disables the check). Get one from
    :meth:`EpochPlan.position_after`.
    """

    epoch: int
    seed: int
    segments: tuple[Segment, ...] = ()
    fingerprint: str = ""

    @classmethod
    def start(cls, epoch: int, seed: int, fingerprint: str = "") -> "LoaderPosition":
        return cls(epoch, seed, (), fingerprint)

    @property
    def step(self) -> int:
        """Steps done in this epoch (over all segments)."""
        return sum(s.steps for s in self.segments)

    @property
    def world(self) -> Optional[int]:
        return self.segments[-1].world if self.segments else None

    def next_epoch(self) -> "LoaderPosition":
        return LoaderPosition(self.epoch + 1, self.seed, (), self.fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": POSITION_VERSION,
            "epoch": int(self.epoch),
            "step": int(self.step),
            "seed": int(self.seed),
            "segments": [
                {
                    "world": s.world,
                    "batch_size": s.batch_size,
                    "window_row_groups": s.window_row_groups,
                    "steps": s.steps,
                    **({"batch_frames": s.batch_frames} if s.batch_frames else {}),
                }
                for s in self.segments
            ],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoaderPosition":
        if d.get("version", POSITION_VERSION) != POSITION_VERSION:
            raise ValueError(f"loader position version {d.get('version')} not understood")
        segs = tuple(
            Segment(
                int(s["world"]),
                int(s["batch_size"]),
                int(s["window_row_groups"]),
                int(s["steps"]),
                int(s.get("batch_frames", 0)),
            )
            for s in d.get("segments", [])
        )
        pos = cls(int(d["epoch"]), int(d["seed"]), segs, str(d.get("fingerprint", "")))
        if "step" in d and int(d["step"]) != pos.step:
            raise ValueError(f"loader position: step {d['step']} does not match its segments ({pos.step})")
        return pos


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One rank's ordered batches for (the rest of) an epoch.

    Per-entry arrays are flat; batch ``i`` is ``[offsets[i], offsets[i+1])``. ``is_pad`` marks repeats added by
    ``remainder="pad"``. ``entries`` are pool indices (unique per draw; a pad repeat carries the index it repeats).
    Steps are plan-relative: plan step ``i`` is step ``start_step + i`` of the epoch.
    """

    rank: int
    world: int
    epoch: int
    seed: int
    batch_size: int
    window_row_groups: int
    start_step: int
    window_steps: int
    sample_ids: np.ndarray = field(repr=False)
    keys: np.ndarray = field(repr=False)
    rows: np.ndarray = field(repr=False)
    n_frames: np.ndarray = field(repr=False)
    is_pad: np.ndarray = field(repr=False)
    entries: np.ndarray = field(repr=False)
    offsets: np.ndarray = field(repr=False)
    windows: tuple[Window, ...] = field(repr=False)
    bucket_bounds: np.ndarray = field(repr=False)
    assigned: int = 0
    """Samples dealt to this rank before the remainder rule (whole epoch / whole resumed remainder)."""
    dropped: int = 0
    """Of those, dropped by ``remainder="drop"``."""
    pool_size: int = 0
    """Draws shared out over all ranks (the epoch's pool, or what was left of it for a re-partitioned resume)."""
    mode: str = "train"
    length_ordered: bool = False
    exact: bool = True
    """True when this plan is exactly (the tail of) the uninterrupted plan of the epoch."""
    note: str = ""
    prior_segments: tuple[Segment, ...] = ()
    segment_offset: int = 0
    fingerprint: str = ""
    batch_frames: int = 0
    """Duration batches' budget of padded frames (``batch_size`` is then 0 and ``batch_sizes`` vary); 0: fixed."""

    # -- batches
    @property
    def steps(self) -> int:
        return int(self.offsets.size - 1)

    def __len__(self) -> int:
        return self.steps

    def batch_ids(self, i: int) -> np.ndarray:
        return self.sample_ids[self.offsets[i] : self.offsets[i + 1]]

    def batch_keys_rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.keys[lo:hi], self.rows[lo:hi]

    def batch_refs(self, i: int) -> list[SampleRef]:
        k, r = self.batch_keys_rows(i)
        return list(zip(k.tolist(), r.tolist()))

    def __iter__(self) -> Iterator[list[SampleRef]]:
        for i in range(self.steps):
            yield self.batch_refs(i)

    @property
    def batch_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    # -- counts and padding
    @property
    def padded(self) -> int:
        return int(self.is_pad.sum())

    @property
    def samples(self) -> int:
        """Entries in the plan, pad repeats included."""
        return int(self.sample_ids.size)

    @property
    def step_max_frames(self) -> np.ndarray:
        """Longest sample of each batch: the time dimension of the padded batch."""
        if self.steps == 0:
            return np.zeros(0, np.int64)
        return np.maximum.reduceat(self.n_frames, self.offsets[:-1]) if self.samples else np.zeros(self.steps, np.int64)

    @property
    def step_bucket(self) -> np.ndarray:
        """Bucket of each batch's longest sample."""
        return np.searchsorted(self.bucket_bounds, self.step_max_frames, side="right")

    @property
    def batch_frames_used(self) -> np.ndarray:
        """Frames of each padded batch tensor (samples x longest): at most ``batch_frames`` for duration batches."""
        return self.step_max_frames * self.batch_sizes

    @property
    def padding_fraction(self) -> float:
        """Padded frames / frames of the padded batch shapes (``sum(size * max_len)``), pad repeats counted as data."""
        if self.samples == 0:
            return 0.0
        shaped = float(self.batch_frames_used.sum())
        return 0.0 if shaped == 0 else 1.0 - float(self.n_frames.sum()) / shaped

    # -- residency
    def resident(self, step: int) -> tuple[int, ...]:
        """Row group keys that must be in memory at plan step ``step``."""
        if not 0 <= step < self.steps:
            raise IndexError(step)
        starts = [w.start for w in self.windows]
        return self.windows[int(np.searchsorted(starts, step, side="right")) - 1].keys

    def residency(self) -> dict[int, tuple[int, int]]:
        """Row group key -> (first, last) plan step of the windows that need it: load before first, evict after last."""
        out: dict[int, tuple[int, int]] = {}
        for w in self.windows:
            for k in w.keys:
                first = out[k][0] if k in out else w.start
                out[k] = (first, w.stop - 1)
        return out

    @property
    def max_resident(self) -> int:
        return max((len(w.keys) for w in self.windows), default=0)

    # -- resume
    def position_after(self, steps_done: int) -> LoaderPosition:
        """The position to checkpoint once ``steps_done`` steps of this plan have run."""
        if self.mode != "train":
            raise ValueError("evaluation plans have no position")
        if not 0 <= steps_done <= self.steps:
            raise ValueError(f"steps_done {steps_done} outside 0..{self.steps}")
        done = self.segment_offset + steps_done
        seg = Segment(self.world, self.batch_size, self.window_row_groups, done, self.batch_frames)
        return LoaderPosition(self.epoch, self.seed, self.prior_segments + ((seg,) if done else ()), self.fingerprint)

    def __repr__(self) -> str:
        return f"EpochPlan({describe(self)})"


def describe(plan: EpochPlan) -> dict[str, Any]:
    """Numbers to log for a plan (JSON-safe). ``max_batch_frames``: the largest padded batch tensor, in frames;
    ``budget_fill``: the mean padded batch's share of ``batch_frames`` (duration batches)."""
    shaped = plan.batch_frames_used
    return {
        "mode": plan.mode,
        "epoch": plan.epoch,
        "rank": plan.rank,
        "world": plan.world,
        "start_step": plan.start_step,
        "steps": plan.steps,
        "batch_size": plan.batch_size,
        "batch_frames": plan.batch_frames,
        "mean_batch_size": round(plan.samples / plan.steps, 2) if plan.steps else 0.0,
        "max_batch_frames": int(shaped.max(initial=0)),
        "budget_fill": round(float(shaped.mean()) / plan.batch_frames, 4) if plan.batch_frames and plan.steps else 0.0,
        "samples": plan.samples,
        "unique_samples": int(np.unique(plan.entries).size),
        "assigned": plan.assigned,
        "dropped": plan.dropped,
        "padded": plan.padded,
        "padding_fraction": round(plan.padding_fraction, 4),
        "pool_size": plan.pool_size,
        "windows": len(plan.windows),
        "window_steps": plan.window_steps,
        "max_resident_row_groups": plan.max_resident,
        "length_ordered": plan.length_ordered,
        "exact": plan.exact,
        "note": plan.note,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Internals


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total``."""
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(np.int64)
    rest = int(total - out.sum())
    if rest > 0:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _limited(table: RowGroupTable, limit: int) -> np.ndarray:
    """Sample ids kept by ``limit``: the first rows of each store, stores in proportion to their sizes."""
    n = table.n_samples
    if limit <= 0 or limit >= n:
        return np.arange(n, dtype=np.int64)
    store = table.stores[table.rg_index]
    _, inv, counts = np.unique(store, return_inverse=True, return_counts=True)
    quota = _largest_remainder(limit, counts)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_store = np.empty(n, np.int64)
    rank_in_store[order] = np.arange(n) - np.repeat(starts, counts)
    return np.flatnonzero(rank_in_store < quota[inv]).astype(np.int64)


def _bucket_bounds(lengths: np.ndarray, buckets: Buckets) -> np.ndarray:
    if isinstance(buckets, (int, np.integer)):
        if buckets <= 1 or lengths.size == 0:
            return np.zeros(0, np.float64)
        q = np.quantile(lengths.astype(np.float64), np.linspace(0.0, 1.0, int(buckets) + 1)[1:-1])
        return np.unique(q)
    bounds = np.asarray(list(buckets), dtype=np.float64)
    if bounds.ndim != 1 or np.any(np.diff(bounds) <= 0):
        raise ValueError("explicit bucket boundaries must be strictly increasing")
    return bounds


@dataclass
class _RankRun:
    sids: np.ndarray
    pidx: np.ndarray
    pad: np.ndarray
    steps: int
    window_steps: int
    assigned: int
    dropped: int
    offsets: np.ndarray
    """Batch ``i`` is entries ``[offsets[i], offsets[i+1])``."""
    window_starts: np.ndarray
    """First step of each window."""


def _split(pool_size: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank split, for training and evaluation alike: rank ``r`` is dealt the ``r``-th of ``world`` contiguous
    runs of the pool, ``ceil(pool_size/world)`` samples for the first ``pool_size % world`` ranks, ``floor`` for the
    rest. Returns every rank's (first position, count)."""
    base, extra = divmod(pool_size, world)
    ranks = np.arange(world, dtype=np.int64)
    return ranks * base + np.minimum(ranks, extra), base + (ranks < extra)


def _mean_rows(table: RowGroupTable, avail: np.ndarray) -> float:
    """Mean rows per row group of the samples used: what ``window_row_groups`` converts to samples with."""
    return avail.size / max(1, np.unique(table.rg_index[avail]).size)


class _Epoch:
    """Everything about one epoch that every rank computes alike."""

    def __init__(self, table: RowGroupTable, spec: PlanSpec, *, epoch: int, seed: int):
        if epoch < 0 or seed < 0:
            raise ValueError("epoch and seed must be non-negative")
        self.table, self.epoch, self.seed = table, epoch, seed
        self.shuffle, self.reverse, self.remainder = spec.shuffle, spec.reverse, spec.remainder
        self.avail = _limited(table, spec.limit)
        spec.batch_rule.check_lengths(table.n_frames[self.avail])
        self.bounds = _bucket_bounds(table.n_frames[self.avail], spec.buckets)
        self.mean_rows = _mean_rows(table, self.avail)
        self.length_ordered = bool((spec.sortagrad or spec.reverse) and (epoch == 0 or not spec.shuffle))
        self.pool = self._pool(spec.weights)
        self.fingerprint = _fingerprint(table, spec)

    def _pool(self, weights: Optional[Sequence[float]]) -> np.ndarray:
        table, avail = self.table, self.avail
        row_group = table.rg_index[avail]
        if weights is None:
            sids, unit = avail, row_group
        else:
            sids, unit = self._weighted(np.asarray(weights, dtype=np.float64), row_group)
        if sids.size == 0:
            return sids
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 0])
            unit_pos = rng.permutation(int(unit.max()) + 1).astype(np.int64)
            key = (unit_pos[unit] << 32) | rng.integers(0, 1 << 32, size=sids.size, dtype=np.int64)
            order = np.argsort(key, kind="stable")
        else:
            order = np.argsort(unit, kind="stable")
        return sids[order]

    def _weighted(self, weights: np.ndarray, row_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        avail = self.avail
        if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("weights must be finite and non-negative, one per store")
        stores = self.table.stores[row_group]
        if stores.size and stores.max() >= weights.size:
            raise ValueError(f"{weights.size} weights for stores 0..{stores.max()}")
        present = np.unique(stores)
        present_weights = weights[present]
        if not np.any(present_weights > 0):
            raise ValueError("no store with a positive weight has samples")
        targets = np.zeros(present.size, np.int64)
        positive = present_weights > 0
        targets[positive] = _largest_remainder(avail.size, present_weights[positive])
        parts_sid, parts_unit, next_unit = [], [], 0
        for store, target in zip(present.tolist(), targets.tolist()):
            mask = stores == store
            idx, groups = avail[mask], row_group[mask]
            _, local = np.unique(groups, return_inverse=True)
            n_local = int(local.max()) + 1
            copies, rest = divmod(int(target), idx.size)
            for _ in range(copies):
                parts_sid.append(idx)
                parts_unit.append(next_unit + local)
                next_unit += n_local
            if rest:
                rng = np.random.default_rng([self.seed, self.epoch, 1, store])
                order = rng.permutation(n_local)
                cum = np.cumsum(np.bincount(local, minlength=n_local)[order])
                whole = int(np.searchsorted(cum, rest))  # row groups taken whole, then part of the next
                need = rest - (int(cum[whole - 1]) if whole else 0)
                partial = np.flatnonzero(local == order[whole])
                pick = np.sort(rng.choice(partial, size=need, replace=False))
                sel = np.sort(np.concatenate([np.flatnonzero(np.isin(local, order[:whole])), pick]))
                parts_sid.append(idx[sel])
                parts_unit.append(next_unit + local[sel])
                next_unit += n_local
        if not parts_sid:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(parts_sid), np.concatenate(parts_unit)

    def sort_key(self, lengths: np.ndarray) -> np.ndarray:
        """What batches are cut along within a window (ties broken at random): exact length in length-ordered epochs,
        else the length bucket (none without shuffle)."""
        if self.length_ordered:
            return -lengths if self.reverse else lengths
        if self.shuffle and self.bounds.size:
            return np.searchsorted(self.bounds, lengths, side="right")
        return np.zeros(lengths.size, np.int64)


def _greedy_cuts(longest: np.ndarray, budget: int, window: int) -> np.ndarray:
    """Batch boundaries over positions ``0..n`` such that ``size x max(longest[batch]) <= budget``, each batch as
    long as it may be, never across a window boundary (multiples of ``window``)."""
    n = longest.size
    cuts = [0]
    for a in range(0, n, window):
        b, i = min(n, a + window), a
        while i < b:
            cap = min(b - i, budget // max(1, int(longest[i])))
            if cap < 1:
                raise ValueError(f"a sample of {int(longest[i])} frames does not fit batch_frames {budget}")
            # size x running max only grows along the batch: the first size over the budget ends it
            shaped = np.maximum.accumulate(longest[i : i + cap]) * np.arange(1, cap + 1)
            i += int(np.searchsorted(shaped, budget, side="right"))
            cuts.append(i)
    return np.asarray(cuts, dtype=np.int64)


def _tie_keys(
    ep: _Epoch,
    salt: int,
    world: int,
    ranks: Sequence[int],
    first: np.ndarray,
    dealt: np.ndarray,
    need: np.ndarray,
    *,
    together: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random tie-breaks of each rank of ``ranks``: one per sample dealt to it and one per repeat it pads with.

    Ranks planned one by one draw from a stream of their own, so a rank never draws for the others; ranks planned
    together draw 32-bit ties for the whole pool from one stream (and the engine sorts them on one int64 key, faster
    than a lexsort). Without shuffle the ties are the input order, repeats after a rank's own samples."""
    pool_size = int(first[-1] + dealt[-1])
    if not ep.shuffle:
        return [(first[rank] + np.arange(dealt[rank]), pool_size + np.arange(need[rank])) for rank in ranks]
    if not together:
        out = []
        for rank in ranks:
            rng = np.random.default_rng([ep.seed, ep.epoch, salt, 2, world, rank])
            out.append((rng.random(int(dealt[rank])), rng.random(int(need[rank]))))
        return out
    rng = np.random.default_rng([ep.seed, ep.epoch, salt, 4, world])
    own = rng.integers(0, 1 << 32, size=pool_size, dtype=np.int64)
    pad = rng.integers(0, 1 << 32, size=world, dtype=np.int64)
    return [(own[first[rank] : first[rank] + dealt[rank]], np.repeat(pad[rank], need[rank])) for rank in ranks]


def _order_in_windows(row_window: np.ndarray, key: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Stable order of flat entries by (row window, key, tie); ``row_window`` and ``key`` are non-negative."""
    group = row_window * (int(key.max()) + 1) + key
    if ties.dtype.kind == "i" and group.max() < 1 << 31:  # 32-bit ties: one int64 sort, faster than a lexsort
        return np.argsort((group << 32) | ties, kind="stable")
    return np.lexsort((ties, group))


class _Deal:
    """Every rank's run over the (remaining) pool ``sids`` (epoch order; ``pidx`` their pool indices) under one layout,
    for either batch rule (see :func:`plan_epoch`).

    The pool is split over ``world`` ranks (:func:`_split`); the remainder rule evens every rank out to the same
    ``kept`` entries (dropping from, or repeating its own samples of, its last window); windows are runs of the same
    number of entries on every rank, each sorted by (length key, random tie), so position ``i`` of a window is the
    same length quantile on every rank. The rule cuts the windows into batches (at the same positions on every rank),
    and one permutation shared by all ranks orders each window's steps. A rule whose cuts depend on every rank's
    samples has all ranks planned at once (and once); otherwise a rank plans only its own share.
    """

    def __init__(
        self,
        ep: _Epoch,
        sids: np.ndarray,
        pidx: np.ndarray,
        *,
        world: int,
        rule: BatchRule,
        window_row_groups: int,
        salt: int,
    ):
        self.ep, self.sids, self.pidx, self.world, self.rule, self.salt = ep, sids, pidx, world, rule, salt
        self.first, self.dealt = _split(int(sids.size), world)
        self.kept = rule.kept(int(self.dealt.min() if ep.remainder == "drop" else self.dealt.max()), ep.remainder)
        self.dropped = np.maximum(self.dealt - self.kept, 0)
        span = None if ep.length_ordered or window_row_groups <= 0 else int(window_row_groups * ep.mean_rows)
        self.window = rule.window(self.kept, span) if self.kept else 1
        self.all_ranks = self._batches(range(world)) if rule.shares_cuts else None

    def run(self, rank: int) -> _RankRun:
        if self.all_ranks is None:
            row, (positions, is_pad, offsets, window_starts, window_steps) = 0, self._batches((rank,))
        else:
            row, (positions, is_pad, offsets, window_starts, window_steps) = rank, self.all_ranks
        return _RankRun(
            self.sids[positions[row]],
            self.pidx[positions[row]],
            is_pad[row],
            int(offsets.size - 1),
            window_steps,
            int(self.dealt[rank]),
            int(self.dropped[rank]),
            offsets,
            window_starts,
        )

    def _batches(self, ranks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """``ranks``' entries (positions in ``sids``, pad flags: ranks x kept) in step order, the batch offsets, the
        first step of each window and the longest window's steps."""
        ep, rule, kept, window, first, dealt = self.ep, self.rule, self.kept, self.window, self.first, self.dealt
        if kept == 0:
            empty = np.zeros((len(ranks), 0), np.int64)
            return empty, empty.astype(bool), np.zeros(1, np.int64), np.zeros(0, np.int64), 1
        pool_size, last_window = int(self.sids.size), (kept - 1) // window * window
        need = np.maximum(kept - dealt, 0)
        ties = _tie_keys(ep, self.salt, self.world, ranks, first, dealt, need, together=rule.shares_cuts)
        # positions: each rank's entries as positions in ``sids``, evened out to ``kept`` in its last window
        positions = np.empty((len(ranks), kept), np.int64)
        tie = np.empty((len(ranks), kept), ties[0][0].dtype)
        is_pad = np.zeros((len(ranks), kept), bool)
        for row, rank in enumerate(ranks):
            own, (own_tie, pad_tie) = first[rank] + np.arange(dealt[rank]), ties[row]
            if dealt[rank] > kept:  # drop the highest ties of the last window
                tail = np.arange(last_window, dealt[rank])
                order = np.lexsort((-tail if rule.drops_earliest_tie else tail, own_tie[tail]))
                keep = np.ones(dealt[rank], bool)
                keep[tail[order[order.size - (dealt[rank] - kept) :]]] = False
                own, own_tie = own[keep], own_tie[keep]
            elif dealt[rank] < kept:  # repeat the lowest ties of the last window (the latest samples if it is empty)
                if dealt[rank]:
                    lo = last_window if dealt[rank] > last_window else max(0, dealt[rank] - rule.pad_from_latest)
                    candidates = own[lo + np.argsort(own_tie[lo:], kind="stable")]
                    repeats = candidates[np.arange(need[rank]) % candidates.size]
                else:  # fewer samples than ranks: borrow
                    repeats = (rank + np.arange(need[rank])) % pool_size
                own, own_tie = np.concatenate([own, repeats]), np.concatenate([own_tie, pad_tie])
                is_pad[row, dealt[rank] :] = True
            positions[row], tie[row] = own, own_tie
        entry_window = np.arange(kept) // window
        lengths = ep.table.n_frames[self.sids[positions]]
        key = ep.sort_key(lengths.ravel())
        row_window = (np.arange(len(ranks))[:, None] * (int(entry_window[-1]) + 1) + entry_window).ravel()
        order = _order_in_windows(row_window, key - key.min(), tie.ravel())
        positions, is_pad, lengths = (a.ravel()[order].reshape(len(ranks), kept) for a in (positions, is_pad, lengths))
        cuts = rule.cuts(lengths, window)
        steps = cuts.size - 1
        step_window = entry_window[cuts[:-1]]
        perm = np.arange(steps)
        if ep.shuffle and not ep.length_ordered:  # one permutation of steps within each window, shared by all ranks
            rng = np.random.default_rng([ep.seed, ep.epoch, self.salt, 3, self.world])
            perm = np.lexsort((rng.random(steps), step_window))
        sizes = np.diff(cuts)[perm]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        columns = np.repeat(cuts[:-1][perm] - offsets[:-1], sizes) + np.arange(kept)
        window_starts = np.flatnonzero(np.diff(step_window[perm], prepend=-1)).astype(np.int64)
        window_steps = int(np.diff(np.append(window_starts, steps)).max())
        return positions[:, columns], is_pad[:, columns], offsets, window_starts, window_steps


def _fingerprint(table: RowGroupTable, spec: PlanSpec) -> str:
    """The data and the settings that must stay the same within an epoch (not the layout: batch size, window)."""
    settings = {
        "shuffle": bool(spec.shuffle),
        "sortagrad": bool(spec.sortagrad),
        "reverse": bool(spec.reverse),
        "limit": int(spec.limit),
        "buckets": int(spec.buckets)
        if isinstance(spec.buckets, (int, np.integer))
        else [float(b) for b in spec.buckets],
        "remainder": spec.remainder,
        "weights": None if spec.weights is None else [float(w) for w in spec.weights],
    }
    h = hashlib.sha256(table.digest().encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _windows(
    table: RowGroupTable, sids: np.ndarray, offsets: np.ndarray, first_step: int, starts: np.ndarray, total_steps: int
) -> tuple[Window, ...]:
    """The windows of a plan that starts at step ``first_step`` of a run whose windows start at steps ``starts``."""
    steps = offsets.size - 1
    if steps == 0:
        return ()
    entry_step = np.repeat(np.arange(steps), np.diff(offsets))
    entry_win = np.searchsorted(starts, first_step + entry_step, side="right") - 1
    n_rg = max(1, table.n_row_groups)
    codes = np.unique(entry_win * n_rg + table.rg_index[sids])
    wins, rgs = codes // n_rg, codes % n_rg
    cuts = np.flatnonzero(np.diff(wins)) + 1
    out = []
    for w_rgs, win in zip(np.split(rgs, cuts), wins[np.concatenate([[0], cuts])]):
        start = max(int(starts[win]), first_step) - first_step
        stop = (int(starts[win + 1]) if win + 1 < starts.size else total_steps) - first_step
        out.append(Window(start, stop, tuple(table.keys[w_rgs].tolist())))
    return tuple(out)


def _check_world(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")


def _train_plan(
    ep: _Epoch,
    run: _RankRun,
    spec: PlanSpec,
    *,
    rank: int,
    world: int,
    offset: int,
    prior: tuple[Segment, ...],
    pool_size: int,
    exact: bool,
    note: str,
) -> EpochPlan:
    if offset > run.steps:
        raise ValueError(f"position is at step {offset} of a segment plan that has only {run.steps} steps")
    table, first = ep.table, int(run.offsets[offset])
    sids, pidx, pad = run.sids[first:], run.pidx[first:], run.pad[first:]
    offsets = run.offsets[offset:] - first
    keys, rows = table.locate(sids)
    return EpochPlan(
        rank=rank,
        world=world,
        epoch=ep.epoch,
        seed=ep.seed,
        batch_size=spec.batch_size,
        window_row_groups=spec.window_row_groups,
        start_step=sum(s.steps for s in prior) + offset,
        window_steps=run.window_steps,
        sample_ids=sids,
        keys=keys,
        rows=rows,
        n_frames=table.n_frames[sids],
        is_pad=pad,
        entries=pidx,
        offsets=offsets,
        windows=_windows(table, sids, offsets, offset, run.window_starts, run.steps),
        bucket_bounds=ep.bounds,
        assigned=run.assigned,
        dropped=run.dropped,
        pool_size=pool_size,
        mode="train",
        length_ordered=ep.length_ordered,
        exact=exact,
        note=note,
        prior_segments=prior,
        segment_offset=offset,
        fingerprint=ep.fingerprint,
        batch_frames=spec.batch_frames,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Public planners


def plan_epoch(row_groups: RowGroups, spec: PlanSpec, *, rank: int, world: int, epoch: int, seed: int) -> EpochPlan:
    """Rank ``rank``'s training batches for ``epoch``. Pure: the same arguments give the same plan on any machine.

    Guarantees (``P`` = draws in the epoch's pool, ``B`` = ``batch_size``; for ``batch_frames`` see Duration batches):

    * **Shared order**: one permutation of row groups seeded by ``(seed, epoch)`` orders the pool for all ranks; a
      different epoch or seed gives a different order.
    * **Disjoint, balanced**: rank ``r`` takes the ``r``-th contiguous run of that order; ranks own disjoint whole row
      groups, a row group on a boundary between ranks (or all of them, when there are fewer row groups than ranks) is
      split by rows, and per-rank totals (``assigned``) differ by at most one row.
    * **Equal steps**: every rank gets exactly ``S`` batches of exactly ``B`` samples.
      ``remainder="drop"``: ``S = floor(floor(P/world)/B)``; a rank drops at most ``B`` of its samples (random ones of
      its last window); nothing is repeated. ``remainder="pad"``: ``S = ceil(ceil(P/world)/B)``; a rank repeats at most
      ``B`` of its own samples (its last window's, cycled if fewer; a rank that has no sample because ``P < world``
      borrows from the pool). Never a whole row group or shard twice, never an extra step.
    * **Shuffle buffer**: samples are mixed within windows of ``window_steps`` steps (the same on all ranks) covering
      about ``window_row_groups`` consecutive row groups of the rank (``<= 0``: the rank's whole share);
      ``EpochPlan.windows`` / ``resident(step)`` / ``residency()`` say which row groups to keep loaded when.
    * **Length buckets** (``buckets``: a count of frame-count quantile buckets, or explicit boundaries; ``<= 1``: none):
      the boundaries come from all samples' lengths (after ``limit``), so every rank has the same ones. Within a window
      a rank sorts by (bucket, random) and cuts ``window_steps`` batches; one permutation shared by all ranks orders
      the window's steps, so at every step every rank runs its batch of the same length quantile (same or adjacent
      bucket). ``EpochPlan.padding_fraction`` reports the padding this implies. Buckets are ignored with
      ``shuffle=False`` and in length-ordered epochs (which sort by exact length).
    * **Length-ordered epochs**: with ``sortagrad`` (DeepSpeech 2 SortaGrad) epoch 0 runs shortest first; ``reverse``
      (DeepSpeech ``--reverse_train``) runs longest first (and implies ordering epoch 0). With ``shuffle=False`` every
      epoch is length-ordered when either is set. Step ``s`` is every rank's ``s``-th batch in length order, so ranks
      stay balanced step by step; the window is the rank's whole share.
    * **Duration batches** (``batch_frames`` ``N``, ``batch_size`` 0): every batch of every rank has at most ``N``
      frames of padded tensor (``batch_sizes * step_max_frames <= N``; ``batch_frames_used``); batch sizes vary with
      length but are the same on every rank at every step, and every rank runs the same steps. Each rank keeps
      exactly ``n`` of its samples: ``remainder="drop"``: ``n = floor(P/world)``, a rank drops at most one sample (a
      random one of its last window); ``"pad"``: ``n = ceil(P/world)``, a rank repeats at most one of its own (a
      random one of its last window, else its latest; a rank with none borrows from the pool). A window is
      ``window_row_groups * mean rows per row group`` samples of the rank, so residency is as with fixed batches;
      within it batches are cut greedily (each as full as the budget allows) along the longest sample of any rank at
      each position of the (bucket, random) order, which is why all ranks can share the cuts and the step order.
      ``window_steps`` is then the longest window's. A sample longer than ``N`` raises ``ValueError``.
    * ``shuffle=False``: fixed order (row groups and rows as given, no buckets); remainders are taken from the end.
    * ``limit`` (DeepSpeech ``--limit_train``): at most ``limit`` samples in all, a fixed subset: the first rows of each
      store in input order, stores in proportion to their sizes.
    * ``weights`` (one per store, indexed by ``RowGroup.store``): the pool keeps its size (all samples, after
      ``limit``) but store ``s`` gets ``weights[s] / sum(weights)`` of it: whole copies of the store plus a random
      (seed, epoch) subset of its row groups, the last one cut by rows. ``None``: each sample once (stores in
      proportion to their sizes). Stores that have no sample get nothing, the others share their weight.
    """
    _check_world(rank, world)
    table = _as_table(row_groups)
    ep = _Epoch(table, spec, epoch=epoch, seed=seed)
    layout = dict(world=world, rule=spec.batch_rule, window_row_groups=spec.window_row_groups, salt=0)
    run = _Deal(ep, ep.pool, np.arange(ep.pool.size), **layout).run(rank)
    return _train_plan(
        ep, run, spec, rank=rank, world=world, offset=0, prior=(), pool_size=int(ep.pool.size), exact=True, note=""
    )


def plan_all(row_groups: RowGroups, spec: PlanSpec, *, world: int, epoch: int, seed: int) -> list[EpochPlan]:
    """:func:`plan_epoch` for every rank (for tools and tests: one rank needs only its own)."""
    table = _as_table(row_groups)
    return [plan_epoch(table, spec, rank=r, world=world, epoch=epoch, seed=seed) for r in range(world)]


def resume_plan(position: LoaderPosition, row_groups: RowGroups, spec: PlanSpec, *, rank: int, world: int) -> EpochPlan:
    """The rest of ``position.epoch`` for ``rank`` (epoch and seed come from ``position``; a fresh
    ``LoaderPosition.start(epoch, seed)`` gives the whole epoch).

    * Same layout (world, batch size or batch_frames, window) as the position's last segment: exactly the tail of
      that segment's plan, from its step ``position.step``, reached by slicing (nothing skipped is read). For a run
      never resized this is the uninterrupted plan's tail, so the samples consumed after kill + restart are those of
      an uninterrupted run.
    * Another layout: the draws of the epoch not consumed yet (all ranks' batches of the steps done in each earlier
      segment, each recomputed from its own layout, however many there were) are re-partitioned over the new ranks
      with all of :func:`plan_epoch`'s guarantees (equal steps, balance, remainder rule, windows, buckets, the frame
      budget), still in the epoch's row-group order; fixed and duration batches may follow each other. Every draw is
      consumed once over the whole epoch, up to the remainder rule of the last segment; which rank sees which
      sample, and the order, differ from an uninterrupted run (``exact`` is False, ``note`` says so). The next epoch
      plans normally at the new size.

    Loader settings other than the layout must not change within an epoch: a non-empty ``position.fingerprint`` that
    does not match the data and settings raises ``ValueError``.
    """
    _check_world(rank, world)
    table = _as_table(row_groups)
    ep = _Epoch(table, spec, epoch=position.epoch, seed=position.seed)
    if position.fingerprint and position.fingerprint != ep.fingerprint:
        raise ValueError(
            "loader position does not match the data or the loader settings (shuffle, sortagrad, reverse, limit, "
            "buckets, remainder, weights must stay the same within an epoch)"
        )
    segs = tuple(s for s in position.segments if s.steps > 0)
    layout = (world, spec.batch_size, spec.window_row_groups, spec.batch_frames)
    if segs and segs[-1].layout == layout:
        prior, offset = segs[:-1], segs[-1].steps
    else:
        prior, offset = segs, 0
    sids, pidx = ep.pool, np.arange(ep.pool.size)
    for i, seg in enumerate(prior):
        consumed = np.zeros(ep.pool.size, bool)
        deal = _Deal(
            ep, sids, pidx, world=seg.world, rule=seg.batch_rule, window_row_groups=seg.window_row_groups, salt=i
        )
        for r in range(seg.world):
            old = deal.run(r)
            if seg.steps > old.steps:
                raise ValueError(f"segment {i} ran {seg.steps} steps but its plan has only {old.steps}")
            done = slice(0, old.offsets[seg.steps])
            # A pad entry repeats a sample that may still be ahead in this epoch: it consumes nothing.
            consumed[old.pidx[done][~old.pad[done]]] = True
        keep = ~consumed[pidx]
        sids, pidx = sids[keep], pidx[keep]
    run = _Deal(
        ep, sids, pidx, world=world, rule=spec.batch_rule, window_row_groups=spec.window_row_groups, salt=len(prior)
    ).run(rank)
    exact = not prior
    step = position.step
    if exact:
        note = f"epoch {ep.epoch}: resumed exactly at step {step} (world {world}), as an uninterrupted run"
        note = note if step else ""
    else:
        history = ", ".join(str(s) for s in segs)
        note = (
            f"epoch {ep.epoch}: resumed at step {step} after {history}; the {sids.size} of {ep.pool.size} samples "
            f"not consumed at the time of the change were re-partitioned over {world} ranks"
            f"{f' (this plan continues that re-partition exactly from its step {offset})' if offset else ''}. "
            f"Each is still used once this epoch (up to the '{spec.remainder}' remainder rule), but which rank sees "
            f"which "
            f"sample and the order differ from an uninterrupted run at world {segs[0].world}, and the epoch has a "
            f"different number of steps; from the next epoch plans are regular at world {world}."
        )
    return _train_plan(
        ep,
        run,
        spec,
        rank=rank,
        world=world,
        offset=offset,
        prior=prior,
        pool_size=int(sids.size),
        exact=exact,
        note=note,
    )


def sample_lengths(row_groups: RowGroups, limit: int = 0) -> np.ndarray:
    """Frame counts of the samples training plans draw from (after ``limit``): ``batch_frames`` must hold the
    longest."""
    table = _as_table(row_groups)
    return table.n_frames[_limited(table, limit)]


def plan_eval(
    row_groups: RowGroups,
    *,
    rank: int,
    world: int,
    batch_size: int,
    limit: int = 0,
    sort_by_length: bool = False,
    window_row_groups: int = DEFAULT_WINDOW_ROW_GROUPS,
    reverse: bool = False,
) -> EpochPlan:
    """Evaluation batches for ``rank``: every sample (after ``limit``) exactly once over all ranks, no padding, no drop.

    Rank ``r`` reads the ``r``-th contiguous run of the data in input order (runs differ by at most one sample), in
    batches of ``batch_size`` (its last one may be short): ranks differ by at most one step, and ranks beyond the
    number of samples have none. ``sort_by_length`` sorts by length within each window (about ``window_row_groups``
    row groups; ``<= 0``: the rank's whole run) to cut padding, longest first with ``reverse`` (DeepSpeech's
    --reverse_dev/--reverse_test); the order is fixed either way.
    """
    _check_world(rank, world)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    table = _as_table(row_groups)
    avail = _limited(table, limit)
    first, dealt = (int(a[rank]) for a in _split(int(avail.size), world))
    sids = avail[first : first + dealt]
    steps = -(-dealt // batch_size)
    if window_row_groups <= 0:
        window_steps = max(1, steps)
    else:
        window_steps = max(1, int(window_row_groups * _mean_rows(table, avail)) // batch_size)
    if sort_by_length and dealt:
        lengths = table.n_frames[sids]
        entry_window = np.arange(dealt) // (window_steps * batch_size)
        sids = sids[np.lexsort((np.arange(dealt), -lengths if reverse else lengths, entry_window))]
    offsets = np.minimum(np.arange(steps + 1, dtype=np.int64) * batch_size, dealt)
    keys, rows = table.locate(sids)
    return EpochPlan(
        rank=rank,
        world=world,
        epoch=0,
        seed=0,
        batch_size=batch_size,
        window_row_groups=window_row_groups,
        start_step=0,
        window_steps=window_steps,
        sample_ids=sids,
        keys=keys,
        rows=rows,
        n_frames=table.n_frames[sids],
        is_pad=np.zeros(dealt, bool),
        entries=sids.copy(),
        offsets=offsets,
        windows=_windows(table, sids, offsets, 0, np.arange(0, steps, window_steps), steps),
        bucket_bounds=np.zeros(0),
        assigned=dealt,
        dropped=0,
        pool_size=int(avail.size),
        mode="eval",
        length_ordered=sort_by_length,
        exact=True,
        note="",
    )


__all__ = [
    "Buckets",
    "BatchRule",
    "EpochPlan",
    "FixedBatchSize",
    "FrameBudget",
    "LoaderPosition",
    "PlanSpec",
    "Remainder",
    "RowGroup",
    "RowGroupTable",
    "SampleRef",
    "Segment",
    "Window",
    "describe",
    "make_row_groups",
    "plan_all",
    "plan_epoch",
    "plan_eval",
    "resume_plan",
    "sample_lengths",
]
