"""One builder for input: store URLs, the loader's settings, the world and a purpose (train, dev, test) in; what
training and evaluation consume out. Nothing else opens stores for them, builds catalogs or constructs a
:class:`~dstrain.loader.reader.PlanReader`.

Example::

    data = TrainInput.build(urls, alphabet, loader_cfg, world, batch_size=16, seed=4568, epochs=30)
    stats = data.feature_statistics()             # collective: every rank calls it
    augment = data.device_augmenter()              # --augment's ops for the training step, or None
    data.load_state_dict(saved)                    # resume mid-epoch (from a checkpoint), or nothing
    for epoch in range(start, 30):
        reader = data.reader(epoch)                # this rank's batches of the (rest of the) epoch
        for x, x_len, y, y_len, keys in reader:    # keys: each sample's (epoch, sample id)
            ...                                    # one training step: augment(x, x_len, y, y_len, keys), the model
            data.step_done()
        data.end_epoch()
    data.state_dict()                              # {"position": ...}: where training stands, for a checkpoint

    dev = EvalInput.build(dev_urls, alphabet, loader_cfg, world, batch_size=8, features=data.features)
    for ids, batch in dev.batches(): ...

What each rank reads, and in which order, is :mod:`dstrain.loader.sampler`'s; how it is read,
:mod:`dstrain.loader.reader`'s; what augmentation does, :mod:`dstrain.augment.filterbank`'s (the ops),
:mod:`dstrain.augment.device`'s (in the training step) and :mod:`dstrain.augment.loader`'s (``overlay``, on the
loader).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from dstrain.alphabet import Alphabet, UTF8Alphabet, ctc_min_frames
from dstrain.augment.filterbank import (
    Augmentation,
    expand_specs,
    in_order,
    overlay_sources,
    parse_augmentations,
    split_ops,
)
from dstrain.augment.loader import LoaderAugmenter, sample_rng
from dstrain.distributed import World
from dstrain.features import FeatureConfig
from dstrain.loader.config import LoaderConfig
from dstrain.loader.reader import Batch, Catalog, PlanReader, Transform, read_row_group
from dstrain.loader.sampler import (
    EpochPlan,
    LoaderPosition,
    PlanSpec,
    plan_epoch,
    plan_eval,
    resume_plan,
    sample_lengths,
)
from dstrain.store import FeatureStore, StoreError
from dstrain.store.stats import FeatureStats

if TYPE_CHECKING:
    from dstrain.augment.device import DeviceAugmenter

log = logging.getLogger("dstrain.loader")

STATS_SAMPLE = 2000
"""Utterances measured for feature statistics when a store's manifest has none (stores of older dstrains)."""


def open_stores(
    urls: Sequence[str], alphabet: Alphabet | UTF8Alphabet, features: FeatureConfig | None = None, reference: str = ""
) -> list[FeatureStore]:
    """The stores of ``urls``, checked to agree with each other and with ``alphabet`` (and, given, with ``features``
    of ``reference``: the training stores, a model): one error naming both sides of any mismatch."""
    stores = [FeatureStore.open(url) for url in urls]
    bytes_mode = isinstance(alphabet, UTF8Alphabet)
    for store in stores:
        if store.manifest.bytes_output_mode != bytes_mode:
            raise StoreError(
                f"{store.url}: preprocessed {'with' if store.manifest.bytes_output_mode else 'without'} "
                f"--bytes_output_mode; use it {'with' if bytes_mode else 'without'} that flag, or "
                "preprocess it again"
            )
        store.check_alphabet(alphabet)
    want, source = (features, reference) if features is not None else (stores[0].features, stores[0].url)
    for store in stores:
        if store.features != want:
            differ = [
                f"{f.name} {getattr(store.features, f.name)} vs {getattr(want, f.name)}"
                for f in dataclasses.fields(want)
                if getattr(store.features, f.name) != getattr(want, f.name)
            ]
            raise StoreError(
                f"{store.url} and {source} have different feature parameters ({', '.join(differ)}); "
                "preprocess them alike"
            )
    return stores


def feature_statistics(stores: Sequence[FeatureStore], catalog: Catalog, world: World) -> FeatureStats:
    """Collective. The stores' per-channel statistics: from their manifests, or (stores made before they were
    recorded) measured by rank 0 on up to :data:`STATS_SAMPLE` utterances and broadcast."""
    recorded = [s.manifest.stats() for s in stores]
    if all(r is not None for r in recorded):
        return FeatureStats.merge_all(recorded)  # type: ignore[arg-type]
    stats = None
    if world.is_root:
        log.warning(
            "the training stores hold no feature statistics (made by an older dstrain): measuring them on "
            "a sample; re-run dstrain preprocess to record them"
        )
        stats, n = FeatureStats.empty(catalog.n_mel), 0
        for ref in catalog.refs:
            for x in read_row_group(ref, catalog.n_mel).features:
                stats, n = stats.merge(FeatureStats.from_features(x)), n + 1
            if n >= STATS_SAMPLE:
                break
    return world.broadcast_object(stats)


class NoiseStore:
    """Random utterances of a feature store, as overlay augmentation's noise; one row group in memory at a time
    (a few cached)."""

    CACHED = 4

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._cache: dict[int, list[np.ndarray]] = {}

    @classmethod
    def open(cls, url: str) -> "NoiseStore":
        # Every rank reads its own noise: a single-process catalog, no collective.
        return cls(Catalog.build([FeatureStore.open(url)], World()))

    def __call__(self, rng: np.random.Generator, n_frames: int) -> np.ndarray:
        key = int(rng.integers(len(self.catalog.refs)))
        if key not in self._cache:
            if len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = read_row_group(self.catalog.refs[key], self.catalog.n_mel).features
        rows = self._cache[key]
        return rows[int(rng.integers(len(rows)))]


def mixing_weights(
    catalog: Catalog, n_stores: int, train_weights: Sequence[float], augmented_weight: float
) -> tuple[float, ...] | None:
    """``PlanSpec.weights``: ``--train_weights`` per store (empty: in proportion to their sizes), and within a store,
    its augmented copies drawn ``augmented_weight`` times as often per sample as its originals (``Catalog.group``
    gives each its own weight). None where every sample is drawn once."""
    if not catalog.has_augmented:
        return tuple(train_weights) or None
    if augmented_weight == 1 and not train_weights:
        return None
    rows = np.zeros((n_stores, 2))
    for ref, frames in zip(catalog.refs, catalog.frames):
        rows[ref.store, int(ref.augmented)] += frames.size
    weights: list[float] = []
    for s, (originals, copies) in enumerate(rows):
        share = train_weights[s] if train_weights else originals + copies
        per_sample = originals + augmented_weight * copies
        weights += (
            [share * originals / per_sample, share * augmented_weight * copies / per_sample]
            if per_sample
            else [0.0, 0.0]
        )
    return tuple(weights)


def planned_frames(batch_frames: int, augmentations: Sequence[Augmentation]) -> tuple[int, float]:
    """(frame budget the plans use, the most augmentation lengthens an utterance): ``--batch_frames`` shrunk by
    the ops' largest stretch (tempo's), so that batches stay within ``--batch_frames`` once augmented (on the loader
    or on the device: the padded batch the model sees is at most the plan's utterances x its longest, stretched)."""
    stretch = math.prod((aug.stretch() for aug in augmentations), start=1.0)
    return int(batch_frames / stretch), stretch


def check_batch_frames(
    lengths: np.ndarray, batch_frames: int, augmentations: Sequence[Augmentation], step_ms: float
) -> int:
    """The plans' frame budget (see :func:`planned_frames`); one error naming the longest utterance and the ways out
    when some utterance cannot fit."""
    frames, stretch = planned_frames(batch_frames, augmentations)
    over = int((lengths > frames).sum())
    if over:
        longest = int(lengths.max())
        tempo = f" (tempo augmentation lengthens utterances up to {stretch:.3g}x: {frames} frames planned)"
        tempo = tempo if stretch > 1 else ""
        raise ValueError(
            f"--batch_frames {batch_frames}{tempo}: {over} training utterance(s) do not fit a batch, the "
            f"longest has {longest} frames ({longest * step_ms / 1000:.1f} s); raise --batch_frames to at "
            f"least {math.ceil(longest * stretch)}, or leave long utterances out with dstrain preprocess "
            "--max_duration"
        )
    return frames


def window_row_groups(catalog: Catalog, memory_mb: float) -> int:
    """Row groups per shuffle window: half the memory budget holds the window, the other half the prefetched next."""
    sizes = [catalog.nbytes(k) for k in range(len(catalog.refs))]
    mean = max(1.0, float(np.mean(sizes))) if sizes else 1.0
    return max(1, int(memory_mb * 2**20 / 2 / mean))


class TrainInput:
    """The training stores of one run as this rank reads them, epoch after epoch, and where it stands.

    The position (which steps of the current epoch are done) is what :meth:`state_dict` returns and a checkpoint
    keeps; :meth:`load_state_dict` makes the next :meth:`reader` resume there (re-partitioned when the world size
    or the batch size changed since). While an epoch's last batches are read, the next epoch's reader starts
    filling its first window, so an epoch never begins by waiting for its data.

    Augmentation (``--augment``) is split (:func:`~dstrain.augment.filterbank.split_ops`): :attr:`augmenter` applies
    what must stay on the loader (``overlay``, and any op before it) as batches are assembled, and
    :meth:`device_augmenter` the rest in the training step; batches carry each sample's (epoch, sample id) for it.
    """

    def __init__(
        self,
        stores: list[FeatureStore],
        catalog: Catalog,
        spec: PlanSpec,
        cfg: LoaderConfig,
        world: World,
        *,
        seed: int,
        epochs: int,
        augmentations: Sequence[Augmentation] = (),
        scan_world: World | None = None,
    ):
        self.stores, self.catalog, self.spec, self.cfg, self.world = stores, catalog, spec, cfg, world
        self.scan_world = scan_world or world
        self.seed, self.epochs = seed, epochs
        self.features: FeatureConfig = stores[0].features
        self.augmentations = tuple(in_order(augmentations))
        """Every op of ``--augment`` (and DeepSpeech 0.6's flags), in the order they run."""
        on_loader, self.device_ops = split_ops(self.augmentations)
        self.augmenter = LoaderAugmenter(on_loader, features=self.features) if on_loader else None
        """The ops the loader applies (numpy, on its threads), or None."""
        self.plan: EpochPlan | None = None
        self.done = 0
        self._resume: LoaderPosition | None = None
        self._current: PlanReader | None = None
        self._ahead: PlanReader | None = None

    @classmethod
    def build(
        cls,
        urls: Sequence[str],
        alphabet: Alphabet | UTF8Alphabet | None,
        cfg: LoaderConfig,
        world: World,
        *,
        batch_size: int,
        seed: int,
        epochs: int,
        shuffle: bool = True,
        scan_world: World | None = None,
    ) -> "TrainInput":
        """Collective over ``scan_world`` (default ``world``: rank 0 scans the shards, every rank gets the catalog;
        a single world: this rank scans them itself). ``alphabet`` None: the first store's."""
        if cfg.train_weights and len(cfg.train_weights) != len(urls):
            raise ValueError(f"--train_weights has {len(cfg.train_weights)} weights for {len(urls)} stores")
        if alphabet is None:
            alphabet = FeatureStore.open(urls[0]).manifest.get_alphabet()
        stores = open_stores(urls, alphabet)
        catalog = Catalog.build(stores, scan_world or world, cfg.skip_bad_shards, augmented=cfg.augmented_weight > 0)
        for s in catalog.skipped:
            log.warning("--skip_bad_shards: left out %s", s)
        translated = cfg.deepspeech06.translate(stores[0].features.step_ms)
        if world.is_root:
            for _, note in translated:
                log.info(note)
        specs = expand_specs(cfg.augment) + [spec for spec, _ in translated]
        augmentations = []
        if specs:
            noise = {url: NoiseStore.open(url) for url in overlay_sources(specs)}
            augmentations = parse_augmentations(specs, noise_source=noise)
        frames = 0
        if cfg.batch_frames:
            frames = check_batch_frames(
                sample_lengths(catalog.table, cfg.limit_train),
                cfg.batch_frames,
                augmentations,
                stores[0].features.step_ms,
            )
            log.info(
                "--batch_frames %d: batches of up to %d padded frames per rank (--train_batch_size is not used)",
                cfg.batch_frames,
                frames,
            )
        spec = PlanSpec(
            batch_size=0 if frames else batch_size,
            batch_frames=frames,
            shuffle=shuffle,
            sortagrad=cfg.sortagrad,
            reverse=cfg.reverse_train,
            limit=cfg.limit_train,
            buckets=cfg.length_buckets,
            remainder=cfg.remainder,
            window_row_groups=window_row_groups(catalog, cfg.loader_memory_mb),
            weights=mixing_weights(catalog, len(stores), cfg.train_weights, cfg.augmented_weight),
        )
        copies = sum(s.manifest.augmented_utterances for s in stores)
        if copies and world.is_root:
            log.info(
                "training stores hold %d augmented copies (of %d utterances): --augmented_weight %g%s",
                copies,
                sum(s.manifest.utterances for s in stores),
                cfg.augmented_weight,
                " leaves them out" if cfg.augmented_weight == 0 else "",
            )
        return cls(
            stores,
            catalog,
            spec,
            cfg,
            world,
            seed=seed,
            epochs=epochs,
            augmentations=augmentations,
            scan_world=scan_world,
        )

    @property
    def feature_dtype(self) -> str:
        return "float16" if self.catalog.itemsize == 2 else "float32"

    def feature_statistics(self) -> FeatureStats:
        """Collective over the scanning world: see :func:`feature_statistics`."""
        return feature_statistics(self.stores, self.catalog, self.scan_world)

    def device_augmenter(self) -> DeviceAugmenter | None:
        """The augmentation the training step applies to each batch before the model
        (:class:`~dstrain.augment.device.DeviceAugmenter`), or None when there is none to apply there."""
        if not self.device_ops:
            return None
        from dstrain.augment.device import DeviceAugmenter  # TensorFlow: only for those who train with it

        return DeviceAugmenter(self.device_ops, self.seed, self.epochs, features=self.features)

    # --- position
    def state_dict(self) -> dict:
        """Where this epoch stands (the same on every rank): ``{"position": LoaderPosition dict or None}``; None
        between epochs."""
        if self.plan is None:
            pos = self._resume
        else:
            pos = self.plan.position_after(self.done) if self.done else None
        return {"position": pos.to_dict() if pos is not None and pos.step else None}

    def load_state_dict(self, state: dict) -> None:
        """The next :meth:`reader` of that epoch resumes after its saved step."""
        pos = state.get("position")
        self._resume = LoaderPosition.from_dict(pos) if pos else None

    # --- epochs
    def plan_for(self, epoch: int) -> EpochPlan:
        """This rank's plan of ``epoch``: the rest of it after a loaded position, else all of it."""
        world, pos = self.world, self._resume
        if pos is not None and pos.epoch == epoch and pos.step:
            return resume_plan(pos, self.catalog.table, self.spec, rank=world.rank, world=world.size)
        return plan_epoch(self.catalog.table, self.spec, rank=world.rank, world=world.size, epoch=epoch, seed=self.seed)

    def reader(self, epoch: int) -> PlanReader:
        """This epoch's reader (its plan is ``reader.plan``): the one started ahead, or a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.plan.epoch == epoch and self._resume is None:
            reader = ahead
        else:
            if ahead is not None:
                ahead.close()
            reader = self._new_reader(self.plan_for(epoch))
        self._resume = None
        self.plan, self.done, self._current = reader.plan, 0, reader
        return reader

    @property
    def epoch_step(self) -> int:
        """The step of the epoch the next batch is (counted from the epoch's start, resumed steps included)."""
        return self.plan.start_step + self.done

    @property
    def last_step(self) -> bool:
        """Whether the next batch is this rank's last of the epoch."""
        return self.done + 1 == self.plan.steps

    def step_samples(self, back: int = 0) -> list[int]:
        """The sample ids of the next batch (``back`` = 1: the one before it), pads left out."""
        i = self.done - back
        lo, hi = self.plan.offsets[i], self.plan.offsets[i + 1]
        return self.plan.sample_ids[lo:hi][~self.plan.is_pad[lo:hi]].tolist()

    def step_done(self) -> None:
        """One more batch of this epoch trained on."""
        self.done += 1
        # Once this epoch's reader holds no row group, the next epoch's starts filling its first window (during the
        # last steps, dev evaluation and checkpointing), within the same memory budget.
        current, plan = self._current, self.plan
        if (
            self._ahead is None
            and current is not None
            and current.produced
            and plan is not None
            and plan.epoch + 1 < self.epochs
        ):
            self._ahead = self._new_reader(self.plan_for(plan.epoch + 1)).start()

    def end_epoch(self) -> None:
        self.plan, self.done, self._current = None, 0, None

    def close(self) -> None:
        for r in (self._current, self._ahead):
            if r is not None:
                r.close()
        self._current = self._ahead = None

    def _new_reader(self, plan: EpochPlan) -> PlanReader:
        cfg = self.cfg
        return PlanReader(
            self.catalog,
            plan,
            threads=cfg.loader_threads,
            memory_mb=cfg.loader_memory_mb,
            prefetch=cfg.loader_prefetch,
            transform=self._transform(plan.epoch),
            skip_bad=cfg.skip_bad_shards,
            keys=True,
        )

    def _transform(self, epoch: int) -> Transform | None:
        if self.augmenter is None:
            return None
        aug, seed, clock = self.augmenter, self.seed, epoch / max(1, self.epochs - 1)
        # min_frames: tempo never makes an utterance too short for its transcript (CTC's loss would be infinite and
        # the whole step skipped on every rank).
        return lambda x, sid, labels: aug.apply(
            x, sample_rng(seed, epoch, sid), clock=clock, min_frames=ctc_min_frames(labels)
        )


class EvalInput:
    """A fixed set of samples (dev or test) dealt out over the ranks in order, every sample exactly once; planned for
    the world as it is when read (an elastic world may have changed since)."""

    def __init__(
        self, catalog: Catalog, cfg: LoaderConfig, world: World, batch_size: int, limit: int = 0, reverse: bool = False
    ):
        self.catalog, self.cfg, self.world, self.batch_size, self.limit = catalog, cfg, world, batch_size, limit
        self.reverse = reverse
        self._plans: dict[tuple[int, int], EpochPlan] = {}

    @classmethod
    def build(
        cls,
        urls: Sequence[str],
        alphabet: Alphabet | UTF8Alphabet,
        cfg: LoaderConfig,
        world: World,
        *,
        batch_size: int,
        limit: int = 0,
        features: FeatureConfig | None = None,
        reference: str = "the training stores",
        reverse: bool = False,
        scan_world: World | None = None,
    ) -> "EvalInput":
        """Collective over ``scan_world`` (default ``world``). ``features`` (of ``reference``): what the stores must
        have been preprocessed with; ``reverse``: longest batches first."""
        stores = open_stores(urls, alphabet, features, reference)
        catalog = Catalog.build(
            stores, scan_world or world, skip_bad_shards=cfg.skip_bad_shards, augmented=False
        )  # originals only
        return cls(catalog, cfg, world, batch_size, limit, reverse)

    @property
    def plan(self) -> EpochPlan:
        """This rank's share at the current world."""
        key = (self.world.rank, self.world.size)
        if key not in self._plans:
            self._plans[key] = plan_eval(
                self.catalog.table,
                rank=key[0],
                world=key[1],
                batch_size=self.batch_size,
                limit=self.limit,
                sort_by_length=True,
                reverse=self.reverse,
            )
        return self._plans[key]

    @property
    def feature_dtype(self) -> str:
        return "float16" if self.catalog.itemsize == 2 else "float32"

    @property
    def ids(self) -> list[str]:
        """The ids of this rank's samples at the current world, in plan order."""
        return self._ids(self.plan, 0, self.plan.sample_ids.size)

    def _ids(self, plan: EpochPlan, lo: int, hi: int) -> list[str]:
        keys, rows = self.catalog.table.locate(plan.sample_ids[lo:hi])
        refs = self.catalog.refs
        return [f"{refs[k].url}#rg{refs[k].index}:{r}" for k, r in zip(keys.tolist(), rows.tolist())]

    def batches(self) -> Iterator[tuple[list[str], Batch]]:
        """This rank's batches with the ids of their samples (with --skip_bad_shards, the samples of unreadable row
        groups are left out, and logged by the reader)."""
        cfg, plan = self.cfg, self.plan
        reader = PlanReader(
            self.catalog,
            plan,
            threads=cfg.loader_threads,
            memory_mb=cfg.loader_memory_mb,
            prefetch=cfg.loader_prefetch,
            skip_bad=cfg.skip_bad_shards,
        )
        for step, batch in enumerate(reader):
            # A batch is assembled only once its row groups are loaded: reader.bad_keys already names its bad ones.
            lo, hi = plan.offsets[step], plan.offsets[step + 1]
            keys = plan.keys[lo:hi].tolist()
            ids = [uid for uid, k in zip(self._ids(plan, lo, hi), keys) if k not in reader.bad_keys]
            if ids:
                yield ids, batch
