"""Training input from feature stores: which rank reads what, and the tf.data pipeline.

Distribution is explicit (``rank``/``world`` arguments, no Horovod import). With at least as many
shards as ranks, each rank reads whole shards of its own; with fewer, rows are dealt out. Ranks
advance in lockstep (every training step is an allreduce), so a rank with fewer samples repeats some
of its own, and the count of repeats is reported.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from dstrain.features import FeatureConfig, dct_matrix
from dstrain.store import FeatureStore, ShardReader, Utterance


@dataclass(frozen=True)
class ShardRef:
    url: str
    rows: int


@dataclass(frozen=True)
class EpochPlan:
    items: tuple[tuple[int, int], ...]
    """(shard index, row index) pairs this rank reads, in order."""
    repeats: int
    """How many of ``items`` are repeats added to keep ranks in step."""


def shard_refs(stores: Sequence[FeatureStore]) -> list[ShardRef]:
    return [ShardRef(url, s.rows) for store in stores for url, s in zip(store.shard_urls(), store.manifest.shards)]


def epoch_plan(shard_rows: Sequence[int], rank: int, world: int, epoch: int, seed: int, shuffle: bool, pad: bool) -> EpochPlan:
    """Which (shard, row) pairs ``rank`` reads in ``epoch``. Pure: every rank computes every plan alike.

    ``pad`` makes all ranks' plans equally long (needed for training steps, not for evaluation).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    rng = np.random.default_rng([seed, epoch])
    n_shards = len(shard_rows)
    order = rng.permutation(n_shards) if shuffle else np.arange(n_shards)

    def rows_of(shard: int, salt: int) -> list[tuple[int, int]]:
        rows = np.arange(shard_rows[shard])
        if shuffle:
            rows = np.random.default_rng([seed, epoch, salt, shard]).permutation(rows)
        return [(int(shard), int(r)) for r in rows]

    if n_shards >= world:
        per_rank = [[s for i, s in enumerate(order) if i % world == r] for r in range(world)]
        counts = [sum(shard_rows[s] for s in shards) for shards in per_rank]
        items = [it for s in per_rank[rank] for it in rows_of(s, 1)]
        target = max(counts)
    else:
        everything = [it for s in order for it in rows_of(s, 2)]
        own = everything[rank::world]
        if not pad or not everything:
            return EpochPlan(tuple(own), 0)
        total = -(-len(everything) // world) * world  # as torch's DistributedSampler: wrap around to fill
        mine = [everything[i % len(everything)] for i in range(rank, total, world)]
        return EpochPlan(tuple(mine), len(mine) - len(own))
    if not pad or len(items) == target or not items:
        return EpochPlan(tuple(items), 0)
    repeats = target - len(items)
    extra = (items * (repeats // len(items) + 1))[:repeats]
    return EpochPlan(tuple(items + extra), repeats)


class ShardCache:
    """Keeps the last few decoded shards; a plan reads shard by shard, so two is plenty."""

    def __init__(self, refs: Sequence[ShardRef], n_mel: int, size: int = 2):
        self.refs, self.n_mel, self.size = refs, n_mel, max(1, size)
        self._cache: OrderedDict[int, list[Utterance]] = OrderedDict()

    def get(self, shard: int, row: int) -> Utterance:
        if shard not in self._cache:
            self._cache[shard] = list(ShardReader(self.refs[shard].url, self.n_mel).utterances())
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard][row]


def make_dataset(
    refs: Sequence[ShardRef], plan: EpochPlan, features: FeatureConfig, batch_size: int, world: int
) -> tf.data.Dataset:
    """Batches of ``(mfcc [B,T,n_mfcc], mfcc_len [B], labels [B,L], label_len [B])``; MFCC = DCT of stored log mel."""
    # Fewer shards than ranks means rows are dealt out across all shards: keep them all (there are < world).
    cache = ShardCache(refs, features.n_mel, size=len(refs) if len(refs) < world else 2)

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard, row in plan.items:
            u = cache.get(shard, row)
            yield u.features.astype(np.float32, copy=False), u.labels

    dct = tf.constant(dct_matrix(features), dtype=tf.float32)

    def to_mfcc(log_mel: tf.Tensor, labels: tf.Tensor):
        return log_mel @ dct, tf.shape(log_mel)[0], labels, tf.shape(labels)[0]

    ds = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec([None, features.n_mel], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ),
    )
    ds = ds.map(to_mfcc, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.padded_batch(batch_size).prefetch(tf.data.AUTOTUNE)
