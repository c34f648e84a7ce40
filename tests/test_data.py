from collections import Counter

import numpy as np
import pytest

from dstrain.loader.pipeline import ShardRef, epoch_plan, make_dataset
from dstrain.store import FeatureStore


@pytest.mark.parametrize("rows,world", [([5, 3, 4, 7], 2), ([10, 10, 1], 3), ([4], 2), ([1], 2), ([3, 2], 4), ([6, 6, 6, 6, 2], 4)])
def test_training_plans_keep_ranks_in_step_and_cover_everything(rows, world):
    for epoch in range(3):
        plans = [epoch_plan(rows, r, world, epoch, seed=1, shuffle=True, pad=True) for r in range(world)]
        assert len({len(p.items) for p in plans}) == 1, "every rank must take the same number of steps"
        seen = Counter(it for p in plans for it in p.items)
        everything = {(s, r) for s, n in enumerate(rows) for r in range(n)}
        assert set(seen) == everything
        assert sum(seen.values()) - len(everything) == sum(p.repeats for p in plans)


def test_shard_level_split_gives_each_rank_its_own_files():
    plans = [epoch_plan([4, 4, 4, 4], r, 2, 0, seed=0, shuffle=True, pad=True) for r in range(2)]
    shards = [{s for s, _ in p.items} for p in plans]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0]) == 2


def test_evaluation_plans_are_disjoint_and_unpadded():
    rows = [3, 1]
    plans = [epoch_plan(rows, r, 3, 0, seed=0, shuffle=False, pad=False) for r in range(3)]
    items = [it for p in plans for it in p.items]
    assert sorted(items) == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_shuffle_changes_with_epoch_and_is_reproducible():
    a = epoch_plan([50], 0, 1, 0, seed=3, shuffle=True, pad=True).items
    assert a == epoch_plan([50], 0, 1, 0, seed=3, shuffle=True, pad=True).items
    assert a != epoch_plan([50], 0, 1, 1, seed=3, shuffle=True, pad=True).items
    assert sorted(a) == [(0, i) for i in range(50)]


def test_dataset_batches_mfcc(ldc93s1_store):
    store = FeatureStore.open(ldc93s1_store)
    refs = [ShardRef(url, s.rows) for url, s in zip(store.shard_urls(), store.manifest.shards)]
    plan = epoch_plan([r.rows for r in refs], 0, 1, 0, seed=0, shuffle=False, pad=True)
    (x, x_len, y, y_len), = list(make_dataset(refs, plan, store.features, batch_size=4, world=1))
    assert x.shape == (1, 145, 26) and int(x_len[0]) == 145
    assert int(y_len[0]) == 52 and store.manifest.get_alphabet().decode(y[0].numpy()) == "she had your dark suit in greasy wash water all year"
    assert np.isfinite(x.numpy()).all()
