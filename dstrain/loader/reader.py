"""Streaming reads of feature stores: Parquet row groups fetched in background threads, in the order an epoch plan
will use them, within a memory budget; batches assembled ahead of the training step (with any augmentation that must
stay on the loader, and the keys of the device's).

The catalog (which row groups exist, the frame count of every row) comes from Parquet footers and the small
``n_frames`` column, read once by rank 0 and broadcast. Features stay in their stored dtype (float16 stays float16)
until the model's first op widens them on the device.

Memory per rank: the row groups of the current shuffle window plus those prefetched for the next, bounded by
``--loader_memory_mb``; a window that alone needs more than the budget is still read whole (the bound is then one
window), and queued batches (``prefetch`` of them) come on top.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dstrain.distributed import World
from dstrain.loader.sampler import EpochPlan, RowGroup, RowGroupTable
from dstrain.store import FeatureStore, ShardReader, StoreError
from dstrain.store.reader import Rows, ShardError

log = logging.getLogger("dstrain.loader")


@dataclass(frozen=True)
class RowGroupRef:
    url: str
    """The shard."""
    index: int
    """Row group within the shard."""
    store: int
    """Index of the store in the list the catalog was made from."""
    augmented: bool = False
    """The row group holds augmented copies (a shard preprocessing flagged ``augmented``)."""


@dataclass
class Catalog:
    """Every row group of some stores, keyed 0..N-1 in store, shard, row group order (stable sample ids)."""

    refs: list[RowGroupRef]
    frames: list[np.ndarray]
    n_mel: int
    itemsize: int
    skipped: list[str]
    """Shards left out by --skip_bad_shards, with the reason."""

    @property
    def has_augmented(self) -> bool:
        return any(r.augmented for r in self.refs)

    def group(self, key: int) -> int:
        """The mixing group of a row group (``RowGroup.store``, what ``PlanSpec.weights`` index): its store, or with
        augmented copies in the catalog, ``2 x store + 1`` for copies and ``2 x store`` for originals, so a store's
        copies can be weighted apart from its originals (:func:`dstrain.loader.builder.mixing_weights`)."""
        ref = self.refs[key]
        return 2 * ref.store + int(ref.augmented) if self.has_augmented else ref.store

    @property
    def table(self) -> RowGroupTable:
        if not hasattr(self, "_table"):
            self._table = RowGroupTable([RowGroup(k, f, self.group(k)) for k, f in enumerate(self.frames)])
        return self._table

    def nbytes(self, key: int) -> int:
        """Decoded size of a row group's features, the part that counts against the memory budget."""
        return int(self.frames[key].sum()) * self.n_mel * self.itemsize

    @classmethod
    def build(
        cls, stores: Sequence[FeatureStore], world: World, skip_bad_shards: bool = False, augmented: bool = True
    ) -> "Catalog":
        """Rank 0 reads every shard's footer and ``n_frames`` column (and checks sizes against the manifest); every
        rank gets the same catalog. ``augmented=False`` leaves out the shards of augmented copies."""
        result = None
        if world.is_root:
            try:
                result = _scan(stores, skip_bad_shards, augmented)
            except StoreError as e:
                result = e
        result = world.broadcast_object(result)
        if isinstance(result, StoreError):
            raise result
        return result


def _scan(stores: Sequence[FeatureStore], skip_bad_shards: bool, augmented: bool = True) -> Catalog:
    refs: list[RowGroupRef] = []
    frames: list[np.ndarray] = []
    skipped: list[str] = []
    n_mel = stores[0].features.n_mel
    itemsize = max(2 if s.manifest.feature_dtype == "float16" else 4 for s in stores)
    for si, store in enumerate(stores):
        sizes_bad = {p.split(":", 1)[0]: p for p in store.verify(checksums=False)}
        for shard, url in zip(store.manifest.shards, store.shard_urls()):
            if shard.augmented and not augmented:
                continue
            problem = sizes_bad.get(shard.path)
            meta = None
            if problem is None:
                try:
                    meta = ShardReader(url, n_mel).row_group_frames()
                except ShardError as e:
                    problem = e.problem
            else:
                problem = problem.split(": ", 1)[-1]
            if problem is not None:
                if not skip_bad_shards:
                    raise StoreError(
                        f"{store.layout.url(shard.path)}: {problem}. Check the store with `dstrain shards info "
                        f"{store.url}` and rebuild it with dstrain preprocess, or pass --skip_bad_shards to train "
                        "without this shard"
                    )
                skipped.append(f"{store.layout.url(shard.path)}: {problem}")
                continue
            for i, f in enumerate(meta):
                refs.append(RowGroupRef(url, i, si, shard.augmented))
                frames.append(f)
    return Catalog(refs, frames, n_mel, itemsize, skipped)


def read_row_group(ref: RowGroupRef, n_mel: int) -> Rows:
    """One row group of the catalog; a read error names the shard and both ways out."""
    try:
        return ShardReader(ref.url, n_mel).read_row_group(ref.index)
    except StoreError as e:
        raise StoreError(f"{e}, or pass --skip_bad_shards to train without it") from None


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(log mel [B,T,n_mel] stored dtype, frames [B] int32, labels [B,L] int32, label lengths [B] int32)"""

KeyedBatch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""A :data:`Batch` and its samples' keys [B, 2] int64 (epoch, sample id): what augmentation on the device draws its
random numbers from (:mod:`dstrain.augment.device`)."""

Transform = Callable[[np.ndarray, int, np.ndarray], np.ndarray]
"""(log mel of one sample, its sample id, its labels) -> log mel (augmentation); must be deterministic in the id.
The labels say how short the result may get and stay feasible for CTC."""


class PlanReader:
    """Reads the batches of one rank's :class:`EpochPlan` in order.

    Row groups are loaded by ``threads`` background threads in order of first use, ahead of time while the budget
    allows, and dropped after their last use; batches are assembled (and transformed) by the same threads,
    ``prefetch`` ahead. Iterating yields :data:`Batch` tuples, :data:`KeyedBatch` ones with ``keys``; :attr:`wait_s`
    accumulates the time the consumer waited, :attr:`bad` the batches replaced because of unreadable row groups (with
    ``skip_bad``).
    """

    def __init__(
        self,
        catalog: Catalog,
        plan: EpochPlan,
        *,
        threads: int = 4,
        memory_mb: float = 1024.0,
        prefetch: int = 4,
        transform: Transform | None = None,
        skip_bad: bool = False,
        keys: bool = False,
    ):
        # Arrow's default allocator (mimalloc) keeps freed row groups' pages for reuse, so a rank's resident memory
        # would grow to the largest window it ever read whatever the budget; the system allocator gives them back.
        pa.set_memory_pool(pa.system_memory_pool())
        self.catalog, self.plan, self.transform, self.skip_bad, self.keys = catalog, plan, transform, skip_bad, keys
        self.budget = int(memory_mb * 2**20)
        self.prefetch = max(1, prefetch)
        self.threads = max(1, threads)
        self.wait_s = 0.0
        self.bad_keys: set[int] = set()
        self.resident_peak = 0
        # Load order and last use, from the plan's windows.
        residency = plan.residency()
        self._order = sorted(residency, key=lambda k: (residency[k][0], k))
        self._last_use = {k: v[1] for k, v in residency.items()}
        self._worker: threading.Thread | None = None

    # The loader runs in its own thread so that reading overlaps the training step.
    def start(self) -> "PlanReader":
        """Starts reading now, before iterating (the trainer starts the next epoch's reader while this one's last
        batches are trained on); iterating starts it too."""
        if self._worker is None:
            self._out = queue.Queue(maxsize=self.prefetch)
            self._stop = threading.Event()
            self._worker = threading.Thread(
                target=self._produce, args=(self._out, self._stop), daemon=True, name="dstrain-loader"
            )
            self._worker.start()
        return self

    @property
    def produced(self) -> bool:
        """Every batch is assembled and every row group released: a next reader now stays within the budget."""
        return self._worker is not None and not self._worker.is_alive()

    def close(self) -> None:
        """Stops the background reading (a reader closed before its end cannot be iterated again)."""
        if self._worker is None:
            return
        self._stop.set()
        while self._worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._out.get_nowait()
            except queue.Empty:
                pass
            self._worker.join(timeout=0.05)

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        try:
            for _ in range(self.plan.steps):
                t0 = time.perf_counter()
                item = self._out.get()
                self.wait_s += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="dstrain-read") as pool:
                loads: dict[int, Future] = {}
                resident = 0
                next_load = 0
                pending: list[Future] = []
                for step in range(self.plan.steps):
                    if stop.is_set():
                        return
                    needed = self.plan.resident(step)
                    # Loads start in order of first use: everything this step needs (the order guarantees it comes
                    # first), then further ahead while the budget allows.
                    while next_load < len(self._order):
                        key = self._order[next_load]
                        over = resident + self.catalog.nbytes(key) > self.budget
                        if over and all(k in loads for k in needed):
                            break
                        if over and pending:
                            # Batches in flight still hold earlier windows' row groups (windows of few steps, large
                            # batches): finish them and drop what only they used before going over the budget.
                            wait(pending)
                            for old in [k for k in loads if self._last_use[k] < step]:
                                loads.pop(old)
                                resident -= self.catalog.nbytes(old)
                        loads[key] = pool.submit(self._load, key)
                        resident += self.catalog.nbytes(key)
                        next_load += 1
                    self.resident_peak = max(self.resident_peak, resident)
                    pending.append(pool.submit(self._assemble, step, {k: loads[k] for k in needed}))
                    # Emit in order, keeping a few batches in flight.
                    while pending and (len(pending) > self.threads or pending[0].done()):
                        self._put(out, pending.pop(0).result(), stop)
                    # Row groups no pending or future step uses are dropped (a pending task keeps its own reference).
                    oldest = step + 1 - len(pending)
                    for key in [k for k in loads if self._last_use[k] < oldest]:
                        loads.pop(key)
                        resident -= self.catalog.nbytes(key)
                while pending:
                    self._put(out, pending.pop(0).result(), stop)
        except BaseException as e:  # surfaces in the consumer, with the shard named
            self._put(out, e, stop)

    @staticmethod
    def _put(out: queue.Queue, item, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _load(self, key: int) -> Rows | None:
        try:
            return read_row_group(self.catalog.refs[key], self.catalog.n_mel)
        except StoreError as e:
            if not self.skip_bad:
                raise
            log.warning("skipping: %s", e)
            self.bad_keys.add(key)
            return None

    def _assemble(self, step: int, groups: dict[int, Future]) -> Batch | KeyedBatch:
        keys, rows = self.plan.batch_keys_rows(step)
        ids = self.plan.batch_ids(step)
        feats, labels, kept = [], [], []
        for key, row, sid in zip(keys.tolist(), rows.tolist(), ids.tolist()):
            data = groups[key].result()
            if data is None:
                continue
            x = data.features[row]
            if self.transform is not None:
                x = self.transform(x, sid, data.labels[row])
            feats.append(x)
            labels.append(data.labels[row])
            kept.append(sid)
        if not feats:  # every sample unreadable (skip_bad): an empty batch; the trainer skips it on all ranks
            batch = (
                np.zeros((0, 1, self.catalog.n_mel), np.float32),
                np.zeros(0, np.int32),
                np.zeros((0, 1), np.int32),
                np.zeros(0, np.int32),
            )
        else:
            batch = pad_batch(feats, labels)
        if not self.keys:
            return batch
        sample_keys = np.empty((len(kept), 2), np.int64)
        sample_keys[:, 0], sample_keys[:, 1] = self.plan.epoch, kept
        return (*batch, sample_keys)


def pad_batch(feats: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> Batch:
    n = len(feats)
    t = np.array([f.shape[0] for f in feats], np.int32)
    ln = np.array([len(y) for y in labels], np.int32)
    x = np.zeros((n, int(t.max()), feats[0].shape[1]), feats[0].dtype)
    y = np.zeros((n, max(1, int(ln.max()))), np.int32)
    for i, (f, lab) in enumerate(zip(feats, labels)):
        x[i, : f.shape[0]] = f
        y[i, : len(lab)] = lab
    return x, t, y, ln
