"""The epoch planner: pure numpy, no TensorFlow or Horovod; every rank's plan is computed here in one process."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from dstrain.loader.sampler import (
    LoaderPosition,
    PlanSpec,
    RowGroup,
    RowGroupTable,
    describe,
    make_row_groups,
    plan_all,
    plan_epoch,
    plan_eval,
    resume_plan,
)

# Uneven row groups (empty ones, one-row ones, one much bigger than the rest), and fewer row groups than ranks.
LAYOUTS = {
    "uneven": [37, 0, 5, 120, 64, 1, 64, 300, 12, 80, 64, 64, 9, 200, 33, 2, 64, 150],
    "few": [3, 11],
    "one": [1],
    "huge": [2, 700, 3],
}


def groups(sizes, seed=0, stores=None, lo=20, hi=2000, first_key=100):
    rng = np.random.default_rng(seed)
    return make_row_groups([rng.integers(lo, hi, size=s) for s in sizes], stores=stores, first_key=first_key)


def uniform(n_groups=400, rows=64, seed=1):
    return groups([rows] * n_groups, seed=seed)


def flat(plans, attr="entries", pad=None):
    out = []
    for p in plans:
        a = getattr(p, attr)
        out.append(a if pad is None else a[p.is_pad == pad])
    return np.concatenate(out) if out else np.zeros(0)


def check_train(plans, batch_size, remainder, pool_size):
    """Every training guarantee that holds for any data: equal steps, full batches, balance, remainder rule."""
    world = len(plans)
    steps = {p.steps for p in plans}
    assert len(steps) == 1, f"ranks disagree on step count: {steps}"
    (S,) = steps
    for p in plans:
        assert np.all(p.batch_sizes == batch_size)
        assert p.samples == S * batch_size
    assigned = [p.assigned for p in plans]
    assert sum(assigned) == pool_size
    assert max(assigned) - min(assigned) <= 1, assigned
    real = flat(plans, pad=False)
    assert np.unique(real).size == real.size, "a draw is used twice (or by two ranks)"
    if remainder == "drop":
        assert all(p.padded == 0 for p in plans)
        for p in plans:
            assert p.dropped == p.assigned - S * batch_size
            assert 0 <= p.dropped <= batch_size
        if pool_size >= world * batch_size:
            assert S >= 1
    else:
        assert sorted(real.tolist()) == list(range(pool_size)), "pad must cover every draw"
        for p in plans:
            assert p.dropped == 0
            assert p.padded == S * batch_size - p.assigned <= batch_size
            check_pads_are_own(p)
    return S


def check_pads_are_own(plan) -> None:
    own = set(plan.entries[~plan.is_pad].tolist())
    if own:
        assert set(plan.entries[plan.is_pad].tolist()) <= own, "pad repeats must be the rank's own samples"


# ---------------------------------------------------------------------------------------------------------------------
# Partition, steps, remainder


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_partition_guarantees(layout, world, remainder):
    rgs = groups(LAYOUTS[layout])
    table = RowGroupTable(rgs)
    B = 4
    plans = plan_all(
        table, PlanSpec(batch_size=B, remainder=remainder, window_row_groups=2), world=world, epoch=2, seed=7
    )
    P = table.n_samples
    S = check_train(plans, B, remainder, P)
    if remainder == "drop":
        assert S == (P // world) // B
    else:
        assert S == -(-(-(-P // world)) // B)
    for p in plans:
        assert p.pool_size == P
        # refs and ids agree
        for i in range(p.steps):
            assert [table.sample_id(k, r) for k, r in p.batch_refs(i)] == p.batch_ids(i).tolist()


@pytest.mark.parametrize("world", range(2, 9))
def test_whole_row_groups_are_disjoint_and_few_are_split(world):
    rgs = groups(LAYOUTS["uneven"])
    sizes = {g.key: g.rows for g in rgs}
    plans = plan_all(rgs, PlanSpec(batch_size=4, remainder="pad"), world=world, epoch=0, seed=3)
    owners: dict[int, set] = {}
    for p in plans:
        counts = Counter(p.keys[~p.is_pad].tolist())
        assert sum(1 for k, c in counts.items() if c < sizes[k]) <= 2, "a rank holds more than two partial row groups"
        for k in counts:
            owners.setdefault(k, set()).add(p.rank)
    shared = [k for k, o in owners.items() if len(o) > 1]
    assert len(shared) <= world - 1


def test_fewer_samples_than_ranks():
    rgs = groups([1])
    pad = plan_all(rgs, PlanSpec(batch_size=4, remainder="pad"), world=8, epoch=0, seed=0)
    assert [p.steps for p in pad] == [1] * 8
    assert pad[0].assigned == 1 and pad[0].padded == 3
    assert all(p.assigned == 0 and p.padded == 4 for p in pad[1:])  # borrowed: nothing of their own
    assert set(flat(pad, "sample_ids").tolist()) == {0}
    drop = plan_all(rgs, PlanSpec(batch_size=4, remainder="drop"), world=8, epoch=0, seed=0)
    assert [p.steps for p in drop] == [0] * 8
    assert sum(p.dropped for p in drop) == 1
    assert describe(drop[0])["steps"] == 0


def test_describe_and_padding_fraction():
    rgs = make_row_groups([[10, 20], [30, 40]])
    (p,) = plan_all(rgs, PlanSpec(batch_size=2, shuffle=False), world=1, epoch=0, seed=0)
    assert [p.batch_ids(i).tolist() for i in range(p.steps)] == [[0, 1], [2, 3]]
    assert p.padding_fraction == pytest.approx(1 - 100 / (2 * 20 + 2 * 40))
    d = describe(p)
    json.dumps(d)
    assert d["steps"] == 2 and d["samples"] == 4 and d["dropped"] == 0 and d["padded"] == 0


def test_input_validation():
    with pytest.raises(ValueError):
        RowGroupTable([RowGroup(1, np.array([1])), RowGroup(1, np.array([2]))])
    with pytest.raises(ValueError):
        plan_epoch(groups([5]), PlanSpec(batch_size=1), rank=2, world=2, epoch=0, seed=0)
    with pytest.raises(ValueError):
        plan_epoch(groups([5]), PlanSpec(batch_size=1, remainder="wrap"), rank=0, world=1, epoch=0, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Order: determinism, windows, buckets, sortagrad


def test_deterministic_and_epoch_seeded():
    rgs = groups(LAYOUTS["uneven"])
    spec, kw = PlanSpec(batch_size=8), dict(world=3, seed=11)
    a, b = plan_all(rgs, spec, epoch=4, **kw), plan_all(rgs, spec, epoch=4, **kw)
    for x, y in zip(a, b):
        assert np.array_equal(x.sample_ids, y.sample_ids) and np.array_equal(x.is_pad, y.is_pad)
        assert x.windows == y.windows
    c = plan_all(rgs, spec, epoch=5, **kw)
    d = plan_all(rgs, spec, epoch=4, **{**kw, "seed": 12})
    for other in (c, d):
        assert not np.array_equal(flat(a, "sample_ids"), flat(other, "sample_ids"))
    # the shared row-group permutation: rank 0's first row group differs across epochs
    firsts = {plan_all(rgs, spec, epoch=e, **kw)[0].keys[0] for e in range(8)}
    assert len(firsts) > 2
    # the row groups a rank reads (not only their mixing) change with the epoch
    pad = PlanSpec(batch_size=8, remainder="pad")
    shares = {frozenset(plan_all(rgs, pad, epoch=e, **kw)[0].keys.tolist()) for e in range(4)}
    assert len(shares) > 1


def test_split_row_group_rows_are_shuffled():
    rgs = groups([700])
    shares = []
    for epoch in (0, 1):
        plans = plan_all(rgs, PlanSpec(batch_size=5, remainder="pad"), world=3, epoch=epoch, seed=0)
        rows = np.sort(plans[0].rows[~plans[0].is_pad])
        assert rows.size == 234 and rows[-1] - rows[0] > 300  # not a contiguous slice of the row group
        shares.append(set(rows.tolist()))
    assert shares[0] != shares[1]


def test_fixed_order_without_shuffle():
    rgs = groups([10, 10, 10])
    p0 = plan_epoch(rgs, PlanSpec(batch_size=5, shuffle=False), rank=0, world=1, epoch=0, seed=1)
    p9 = plan_epoch(rgs, PlanSpec(batch_size=5, shuffle=False), rank=0, world=1, epoch=9, seed=2)
    assert p0.sample_ids.tolist() == list(range(30)) == p9.sample_ids.tolist()


def test_windows_bound_residency():
    rgs = uniform()
    K, B = 4, 16
    for p in plan_all(rgs, PlanSpec(batch_size=B, window_row_groups=K), world=4, epoch=1, seed=0):
        assert p.window_steps == K * 64 // B
        assert p.windows[0].start == 0 and p.windows[-1].stop == p.steps
        assert all(w.stop == v.start for w, v in zip(p.windows, p.windows[1:]))
        assert p.max_resident <= K + 2
        for s in range(p.steps):
            assert set(p.batch_keys_rows(s)[0].tolist()) <= set(p.resident(s))
        spans = p.residency()
        assert set(spans) == set(p.keys.tolist())
        for s in range(0, p.steps, 7):
            for k in p.batch_keys_rows(s)[0].tolist():
                assert spans[k][0] <= s <= spans[k][1]
        # a window mixes its row groups: the first window's first batch comes from several of them
        assert len(set(p.batch_keys_rows(0)[0].tolist())) > 1


def _spread(plans):
    """Mean over steps of (longest - shortest) rank's mean batch length."""
    m = np.stack([p.n_frames.reshape(p.steps, p.batch_size).mean(1) for p in plans])
    return float((m.max(0) - m.min(0)).mean())


def test_buckets_align_ranks_step_by_step():
    rgs = uniform()
    kw = dict(world=4, epoch=3, seed=5)
    plain = plan_all(rgs, PlanSpec(batch_size=16, window_row_groups=8, buckets=0), **kw)
    coarse = plan_all(rgs, PlanSpec(batch_size=16, window_row_groups=8, buckets=8), **kw)
    fine = plan_all(rgs, PlanSpec(batch_size=16, window_row_groups=8, buckets=32), **kw)
    assert _spread(coarse) < 0.4 * _spread(plain)
    assert _spread(fine) < 0.3 * _spread(plain)
    b = np.stack([p.step_bucket for p in coarse])
    assert np.mean(b.max(0) - b.min(0) <= 1) > 0.95
    assert max(p.padding_fraction for p in coarse) < 0.5 * min(p.padding_fraction for p in plain)
    assert max(p.padding_fraction for p in fine) < 0.5 * min(p.padding_fraction for p in coarse)
    assert len(coarse[0].bucket_bounds) == 7
    # the step order within a window is shuffled (not always shortest first)
    first = coarse[0].step_max_frames[: coarse[0].window_steps]
    assert np.any(np.diff(first) < 0)


def test_explicit_bucket_boundaries():
    p = plan_epoch(uniform(), PlanSpec(batch_size=16, buckets=[500, 1000, 1500]), rank=0, world=2, epoch=0, seed=0)
    assert p.bucket_bounds.tolist() == [500, 1000, 1500]
    assert set(p.step_bucket.tolist()) <= {0, 1, 2, 3}


def test_sortagrad_and_reverse():
    rgs = uniform(n_groups=100)
    kw = dict(world=4, seed=2)
    sortagrad = PlanSpec(batch_size=8, sortagrad=True)
    for p in plan_all(rgs, sortagrad, epoch=0, **kw):
        assert p.length_ordered and np.all(np.diff(p.n_frames) >= 0)
    sorted_spread = _spread(plan_all(rgs, sortagrad, epoch=0, **kw))
    assert sorted_spread < 0.2 * _spread(plan_all(rgs, PlanSpec(batch_size=8, buckets=0), epoch=0, **kw))
    later = plan_all(rgs, sortagrad, epoch=1, **kw)
    assert not later[0].length_ordered and np.any(np.diff(later[0].n_frames) < 0)
    for p in plan_all(rgs, PlanSpec(batch_size=8, reverse=True), epoch=0, **kw):
        assert np.all(np.diff(p.n_frames) <= 0)
    fixed = [plan_all(rgs, PlanSpec(batch_size=8, reverse=True, shuffle=False), epoch=e, **kw) for e in (0, 3)]
    for a, b in zip(*fixed):
        assert np.array_equal(a.sample_ids, b.sample_ids) and np.all(np.diff(a.n_frames) <= 0)


def test_limit():
    rgs = groups(LAYOUTS["uneven"])
    for world in (1, 3):
        plans = plan_all(rgs, PlanSpec(batch_size=4, limit=100, remainder="pad"), world=world, epoch=1, seed=0)
        assert plans[0].pool_size == 100
        assert set(flat(plans, "sample_ids").tolist()) == set(range(100))
    # several stores: the first rows of each, in proportion to their sizes
    two = groups([150, 150, 100], stores=[0, 0, 1])
    plans = plan_all(two, PlanSpec(batch_size=2, limit=80, remainder="pad"), world=2, epoch=0, seed=0)
    ids = set(flat(plans, "sample_ids").tolist())
    assert ids == set(range(60)) | set(range(300, 320))
    assert plan_epoch(two, PlanSpec(batch_size=2, limit=10**6), rank=0, world=1, epoch=0, seed=0).pool_size == 400


def test_store_weights():
    rgs = groups([100] * 10 + [50] * 4, stores=[0] * 10 + [1] * 4)
    table = RowGroupTable(rgs)
    store_of_id = table.stores[table.rg_index]
    kw = dict(world=3, seed=4)
    by_epoch = []
    for epoch in (0, 1):
        plans = plan_all(table, PlanSpec(batch_size=8, remainder="pad", weights=(1, 1)), epoch=epoch, **kw)
        check_train(plans, 8, "pad", 1200)
        ids = flat(plans, "sample_ids", pad=False)
        counts = Counter(ids.tolist())
        assert np.sum(store_of_id[ids] == 0) == 600 and np.sum(store_of_id[ids] == 1) == 600
        assert all(counts[i] == 3 for i in range(1000, 1200))  # store 1 three times over
        a = [i for i in counts if store_of_id[i] == 0]
        assert len(a) == 600 and max(counts[i] for i in a) == 1
        # the subset of store 0 is whole row groups but one
        per_group = Counter(table.rg_index[a].tolist())
        assert sum(1 for c in per_group.values() if c not in (0, 100)) <= 1
        by_epoch.append(set(a))
    assert by_epoch[0] != by_epoch[1]
    plain = plan_all(table, PlanSpec(batch_size=8, remainder="pad"), epoch=0, **kw)
    assert sorted(flat(plain, "sample_ids", pad=False).tolist()) == list(range(1200))
    only1 = flat(
        plan_all(table, PlanSpec(batch_size=8, remainder="pad", weights=(0, 2)), epoch=0, **kw), "sample_ids", pad=False
    )
    assert set(store_of_id[only1].tolist()) == {1} and only1.size == 1200
    uneven = Counter(
        flat(
            plan_all(table, PlanSpec(batch_size=8, remainder="pad", weights=(1, 3)), epoch=0, **kw),
            "sample_ids",
            pad=False,
        ).tolist()
    )
    assert sum(c for i, c in uneven.items() if i >= 1000) == 900
    assert {uneven[i] for i in range(1000, 1200)} <= {4, 5}


# ---------------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_resume_same_world_is_the_tail(world, remainder):
    rgs = groups(LAYOUTS["uneven"])
    spec = PlanSpec(batch_size=4, remainder=remainder, window_row_groups=2)
    plans = plan_all(rgs, spec, world=world, epoch=2, seed=9)
    S, B = plans[0].steps, 4
    for cut in sorted({0, 1, S // 3, S // 2, S - 1, S}):
        pos = plans[0].position_after(cut)
        assert all(p.position_after(cut) == pos for p in plans)
        pos = LoaderPosition.from_dict(json.loads(json.dumps(pos.to_dict())))
        assert pos.step == cut and pos.epoch == 2
        for r, full in enumerate(plans):
            tail = resume_plan(pos, rgs, spec, rank=r, world=world)
            assert tail.exact and tail.start_step == cut and tail.steps == S - cut
            assert np.array_equal(tail.sample_ids, full.sample_ids[cut * B :])
            assert np.array_equal(tail.is_pad, full.is_pad[cut * B :])
            if tail.steps:
                assert set(tail.resident(0)) <= set(full.resident(cut))
            # checkpointing again from the resumed plan is the same as from the full one
            if cut < S:
                assert tail.position_after(1) == full.position_after(cut + 1)
    fresh = resume_plan(LoaderPosition.start(2, 9), rgs, spec, rank=0, world=world)
    assert np.array_equal(fresh.sample_ids, plans[0].sample_ids)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_resume_other_world_consumes_the_rest_once(remainder):
    rgs = groups(LAYOUTS["uneven"] * 3, seed=2)
    pool = RowGroupTable(rgs).n_samples
    B = 4
    spec = PlanSpec(batch_size=B, remainder=remainder, window_row_groups=3)
    first = plan_all(rgs, spec, world=8, epoch=1, seed=1)
    k1 = first[0].steps // 3
    used = [flat([p], "entries")[: k1 * B] for p in first]
    pos = first[0].position_after(k1)

    second = [resume_plan(pos, rgs, spec, rank=r, world=3) for r in range(3)]
    done1 = np.unique(np.concatenate(used))
    check_train_rest(second, B, remainder, pool - done1.size)
    assert not second[0].exact and "re-partitioned" in second[0].note and second[0].start_step == k1
    assert not set(flat(second, pad=False).tolist()) & set(done1.tolist())

    k2 = second[0].steps // 2
    used += [p.entries[: k2 * B] for p in second]
    pos2 = LoaderPosition.from_dict(json.loads(json.dumps(second[1].position_after(k2).to_dict())))
    assert [s.world for s in pos2.segments] == [8, 3] and pos2.step == k1 + k2
    # the same layout again continues the re-partitioned plan exactly
    again = resume_plan(pos2, rgs, spec, rank=2, world=3)
    assert np.array_equal(again.sample_ids, second[2].sample_ids[k2 * B :]) and again.start_step == k1 + k2

    third = [resume_plan(pos2, rgs, spec, rank=r, world=5) for r in range(5)]
    done2 = np.unique(np.concatenate(used))
    check_train_rest(third, B, remainder, pool - done2.size)
    everything = np.concatenate(used + [p.entries for p in third])
    if remainder == "drop":
        counts = Counter(everything.tolist())
        assert max(counts.values()) == 1, "a sample was consumed twice"
        assert pool - len(counts) <= 5 * B  # only the last segment's remainder is lost
        assert set(counts) <= set(range(pool))
    else:
        assert set(everything.tolist()) == set(range(pool))
        assert not set(flat(third, pad=False).tolist()) & set(done2.tolist())
    # the next epoch is a regular plan at the new size
    nxt = resume_plan(pos2.next_epoch(), rgs, spec, rank=0, world=5)
    assert nxt.exact
    assert np.array_equal(nxt.sample_ids, plan_epoch(rgs, spec, rank=0, world=5, epoch=2, seed=1).sample_ids)


def check_train_rest(plans, batch_size, remainder, pool_size):
    """check_train for a re-partitioned pool: entries are the epoch's pool indices, so compare counts, not ranges."""
    assert all(p.pool_size == pool_size for p in plans)
    steps = {p.steps for p in plans}
    assert len(steps) == 1
    (S,) = steps
    assigned = [p.assigned for p in plans]
    assert sum(assigned) == pool_size and max(assigned) - min(assigned) <= 1
    real = flat(plans, pad=False)
    assert np.unique(real).size == real.size
    for p in plans:
        assert np.all(p.batch_sizes == batch_size)
        if remainder == "drop":
            assert p.padded == 0 and p.dropped <= batch_size
        else:
            assert p.padded <= batch_size and p.dropped == 0
    if remainder == "pad":
        assert real.size == pool_size


def test_resume_with_a_new_batch_size_and_changed_settings():
    rgs = groups(LAYOUTS["uneven"])
    p = plan_epoch(rgs, PlanSpec(batch_size=4), rank=0, world=2, epoch=0, seed=0)
    pos = p.position_after(5)
    other = [resume_plan(pos, rgs, PlanSpec(batch_size=8), rank=r, world=2) for r in range(2)]
    assert not other[0].exact and other[0].steps == other[1].steps
    assert all(np.all(q.batch_sizes == 8) for q in other)
    with pytest.raises(ValueError):
        resume_plan(pos, rgs, PlanSpec(batch_size=4, remainder="pad"), rank=0, world=2)
    with pytest.raises(ValueError):
        resume_plan(pos, groups(LAYOUTS["uneven"], seed=5), PlanSpec(batch_size=4), rank=0, world=2)
    with pytest.raises(ValueError):
        p.position_after(p.steps + 1)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("world", range(1, 9))
def test_eval_every_sample_once(layout, world):
    table = RowGroupTable(groups(LAYOUTS[layout]))
    plans = [plan_eval(table, rank=r, world=world, batch_size=8) for r in range(world)]
    ids = flat(plans, "sample_ids")
    assert sorted(ids.tolist()) == list(range(table.n_samples))
    assert max(p.steps for p in plans) - min(p.steps for p in plans) <= 1
    for p in plans:
        assert p.padded == 0 and p.dropped == 0
        assert np.all(p.batch_sizes[:-1] == 8) and np.all((p.batch_sizes >= 1) & (p.batch_sizes <= 8))
        assert np.all(np.diff(p.sample_ids) == 1)  # natural order


def test_eval_sorted_by_length():
    rgs = uniform(n_groups=50)
    plain = plan_eval(rgs, rank=1, world=2, batch_size=16)
    tidy = plan_eval(rgs, rank=1, world=2, batch_size=16, sort_by_length=True, window_row_groups=0)
    assert sorted(plain.sample_ids.tolist()) == sorted(tidy.sample_ids.tolist())
    assert np.all(np.diff(tidy.n_frames) >= 0)
    assert tidy.padding_fraction < 0.3 * plain.padding_fraction
    limited = [plan_eval(rgs, rank=r, world=3, batch_size=16, limit=100) for r in range(3)]
    assert sorted(flat(limited, "sample_ids").tolist()) == list(range(100))


def test_a_million_samples_plan_quickly():
    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 300, size=4000)
    table = RowGroupTable(make_row_groups([rng.integers(50, 1500, size=s) for s in sizes]))
    p = plan_epoch(table, PlanSpec(batch_size=32, window_row_groups=8), rank=7, world=8, epoch=3, seed=1)
    assert p.steps == (table.n_samples // 8) // 32
    assert p.max_resident <= 12


# ---------------------------------------------------------------------------------------------------------------------
# Duration batches (batch_frames)


def duration(frames, remainder="drop", **kw):
    return PlanSpec(batch_size=0, batch_frames=frames, remainder=remainder, **kw)


def check_duration(plans, frames, remainder, pool_size):
    """Every guarantee of duration batches that holds for any data: the budget, equal steps and batch sizes on all
    ranks at every step, balance, at most one sample dropped or repeated per rank."""
    steps = {p.steps for p in plans}
    assert len(steps) == 1, f"ranks disagree on step count: {steps}"
    (S,) = steps
    for p in plans:
        assert p.batch_size == 0 and p.batch_frames == frames
        assert np.all(p.batch_frames_used <= frames), "a batch over the frame budget"
        assert np.all(p.batch_sizes >= 1)
        assert np.array_equal(p.batch_sizes, plans[0].batch_sizes), "ranks run batches of different sizes"
        assert p.windows[0].start == 0 and p.windows[-1].stop == p.steps if S else not p.windows
        for s in range(p.steps):
            assert set(p.batch_keys_rows(s)[0].tolist()) <= set(p.resident(s))
    assigned = [p.assigned for p in plans]
    assert sum(assigned) == pool_size and max(assigned) - min(assigned) <= 1
    real = flat(plans, pad=False)
    assert np.unique(real).size == real.size, "a draw is used twice (or by two ranks)"
    if remainder == "drop":
        assert all(p.padded == 0 and p.dropped <= 1 and p.samples == p.assigned - p.dropped for p in plans)
    else:
        assert real.size == pool_size, "pad must cover every draw"
        for p in plans:
            assert p.dropped == 0 and p.padded <= 1 and p.samples == p.assigned + p.padded
            check_pads_are_own(p)
    return S


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_duration_batches_guarantees(layout, world, remainder):
    table = RowGroupTable(groups(LAYOUTS[layout]))
    frames = 5000  # samples of 20..2000 frames: 2 to 250 of them a batch
    plans = plan_all(table, duration(frames, remainder, window_row_groups=2), world=world, epoch=2, seed=7)
    S = check_duration(plans, frames, remainder, table.n_samples)
    P = table.n_samples
    assert (S >= 1) == (P >= world if remainder == "drop" else P >= 1)
    d = describe(plans[0])
    json.dumps(d)
    assert d["batch_frames"] == frames and d["max_batch_frames"] <= frames and (S == 0 or 0 < d["budget_fill"] <= 1)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_duration_batches_with_store_weights_and_limit(remainder):
    table = RowGroupTable(groups([100] * 10 + [50] * 4, stores=[0] * 10 + [1] * 4))
    plans = plan_all(table, duration(4000, remainder, weights=(1, 3)), world=3, epoch=1, seed=4)
    check_duration(plans, 4000, remainder, 1200)
    ids = flat(plans, "sample_ids", pad=False)
    assert np.sum(table.stores[table.rg_index[ids]] == 1) >= 900 - 3  # store 1 upsampled 4.5x
    limited = plan_all(table, duration(4000, remainder, limit=300), world=3, epoch=1, seed=4)
    check_duration(limited, 4000, remainder, 300)


def test_duration_batches_fill_the_budget_short_many_long_few():
    rgs = uniform(n_groups=100)
    frames = 16000
    plans = plan_all(rgs, duration(frames, window_row_groups=8), world=4, epoch=1, seed=3)
    check_duration(plans, frames, "drop", 6400)
    p = plans[0]
    short, long = p.step_max_frames < 500, p.step_max_frames > 1500
    assert p.batch_sizes[short].min() > p.batch_sizes[long].max()  # 20..2000 frames: 32+ short ones, at most 10 long
    # batches are as full as the budget allows: one more sample as long as the step's longest would not fit
    longest = np.stack([q.step_max_frames for q in plans]).max(0)
    assert np.mean((p.batch_sizes + 1) * longest > frames) > 0.9
    assert describe(p)["budget_fill"] > 0.85
    # fewer steps than fixed batches that fit the longest sample (16000 / 2000 = 8 a batch)
    fixed = plan_epoch(rgs, PlanSpec(batch_size=8, window_row_groups=8), rank=0, world=4, epoch=1, seed=3)
    assert p.steps < 0.6 * fixed.steps


def test_duration_batches_align_ranks_step_by_step():
    rgs = uniform()
    kw = dict(world=4, epoch=3, seed=5)
    plain = plan_all(rgs, duration(12000, buckets=0, window_row_groups=8), **kw)
    coarse = plan_all(rgs, duration(12000, buckets=8, window_row_groups=8), **kw)
    spread = lambda plans: float(np.mean(np.ptp(np.stack([q.step_max_frames for q in plans]), axis=0)))  # noqa: E731
    assert spread(coarse) < 0.4 * spread(plain)
    b = np.stack([p.step_bucket for p in coarse])
    assert np.mean(b.max(0) - b.min(0) <= 1) > 0.95
    assert max(p.padding_fraction for p in coarse) < 0.5 * min(p.padding_fraction for p in plain)
    first = coarse[0].step_max_frames[: coarse[0].windows[0].stop]
    assert np.any(np.diff(first) < 0), "the step order within a window is shuffled"
    # residency as with fixed batches of the same window
    fixed = plan_all(rgs, PlanSpec(batch_size=16, window_row_groups=8), **kw)
    assert max(p.max_resident for p in coarse) <= max(p.max_resident for p in fixed) + 1


def test_duration_batches_sortagrad_and_reverse():
    rgs = uniform(n_groups=60)
    for spec, sign in ((duration(8000, sortagrad=True), 1), (duration(8000, reverse=True, remainder="pad"), -1)):
        plans = plan_all(rgs, spec, world=3, epoch=0, seed=2)
        check_duration(plans, 8000, spec.remainder, RowGroupTable(rgs).n_samples)
        for p in plans:
            assert p.length_ordered and np.all(sign * np.diff(p.n_frames) >= 0)
        # shortest first: batches shrink as samples grow
        assert sign * (plans[0].batch_sizes[0] - plans[0].batch_sizes[-1]) > 0


def test_duration_batches_a_sample_over_the_budget_is_an_error():
    rgs = make_row_groups([[100, 300, 2500, 200], [2600, 50]])
    with pytest.raises(
        ValueError, match=r"batch_frames 2000: 2 sample\(s\) are longer, the longest 2600 frames; raise"
    ):
        plan_epoch(rgs, duration(2000), rank=0, world=1, epoch=0, seed=0)
    # limit keeps only the first rows of the store: the long ones are not used, so not an error
    assert plan_epoch(rgs, duration(2000, limit=2), rank=0, world=1, epoch=0, seed=0).samples == 2
    with pytest.raises(ValueError, match="not both"):
        PlanSpec(batch_size=4, batch_frames=2000)
    with pytest.raises(ValueError):
        PlanSpec(batch_size=0)


@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_duration_resume_same_world_is_the_tail(world, remainder):
    rgs = groups(LAYOUTS["uneven"])
    spec = duration(6000, remainder, window_row_groups=2)
    plans = plan_all(rgs, spec, world=world, epoch=2, seed=9)
    S = plans[0].steps
    for cut in sorted({0, 1, S // 3, S // 2, S - 1, S}):
        pos = plans[0].position_after(cut)
        d = json.loads(json.dumps(pos.to_dict()))
        assert all(s["batch_frames"] == 6000 and s["batch_size"] == 0 for s in d["segments"])
        pos = LoaderPosition.from_dict(d)
        for r, full in enumerate(plans):
            tail = resume_plan(pos, rgs, spec, rank=r, world=world)
            lo = full.offsets[cut]
            assert tail.exact and tail.start_step == cut and tail.steps == S - cut
            assert np.array_equal(tail.sample_ids, full.sample_ids[lo:]) and np.array_equal(
                tail.is_pad, full.is_pad[lo:]
            )
            assert np.array_equal(tail.batch_sizes, full.batch_sizes[cut:])
            if tail.steps:
                assert set(tail.resident(0)) <= set(full.resident(cut))
            if cut < S:
                assert tail.position_after(1) == full.position_after(cut + 1)


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_duration_resume_other_world_and_budget_consumes_the_rest_once(remainder):
    """Fixed batches at world 8, then duration batches at world 3, then another budget at world 5: every draw once."""
    rgs = groups(LAYOUTS["uneven"] * 3, seed=2)
    pool = RowGroupTable(rgs).n_samples
    first = plan_all(rgs, PlanSpec(batch_size=4, remainder=remainder, window_row_groups=3), world=8, epoch=1, seed=1)
    k1 = first[0].steps // 3
    used = [p.entries[: k1 * 4] for p in first]
    pos = first[0].position_after(k1)
    assert "batch_frames" not in json.dumps(pos.to_dict()), "fixed-batch positions keep their JSON"

    spec2 = duration(5000, remainder, window_row_groups=3)
    second = [resume_plan(pos, rgs, spec2, rank=r, world=3) for r in range(3)]
    done1 = np.unique(np.concatenate(used))
    check_duration(second, 5000, remainder, pool - done1.size)
    assert not second[0].exact and "world 8 x batch 4 for" in second[0].note and second[0].start_step == k1
    assert not set(flat(second, pad=False).tolist()) & set(done1.tolist())

    k2 = second[0].steps // 2
    used += [p.entries[: p.offsets[k2]] for p in second]
    pos2 = LoaderPosition.from_dict(json.loads(json.dumps(second[1].position_after(k2).to_dict())))
    assert [(s.world, s.batch_frames) for s in pos2.segments] == [(8, 0), (3, 5000)] and pos2.step == k1 + k2
    again = resume_plan(pos2, rgs, spec2, rank=2, world=3)
    assert np.array_equal(again.sample_ids, second[2].sample_ids[second[2].offsets[k2] :])

    spec3 = duration(9000, remainder, window_row_groups=3)
    third = [resume_plan(pos2, rgs, spec3, rank=r, world=5) for r in range(5)]
    assert "world 3 x batches of 5000 frames" in third[0].note
    done2 = np.unique(np.concatenate(used))
    check_duration(third, 9000, remainder, pool - done2.size)
    everything = np.concatenate(used + [p.entries for p in third])
    counts = Counter(everything.tolist())
    if remainder == "drop":
        assert max(counts.values()) == 1 and pool - len(counts) <= 5  # at most one sample per rank of the last segment
    else:
        assert set(counts) == set(range(pool))
        assert not set(flat(third, pad=False).tolist()) & set(done2.tolist())
    # and back from duration batches to fixed ones
    fixed = [
        resume_plan(pos2, rgs, PlanSpec(batch_size=4, remainder=remainder, window_row_groups=3), rank=r, world=2)
        for r in range(2)
    ]
    check_train_rest(fixed, 4, remainder, pool - done2.size)


def test_duration_batches_plan_a_million_samples_at_world_512():
    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 300, size=4000)
    table = RowGroupTable(make_row_groups([rng.integers(50, 1500, size=s) for s in sizes]))
    spec = duration(48000, window_row_groups=8)
    a, b = (plan_epoch(table, spec, rank=r, world=512, epoch=3, seed=1) for r in (0, 511))
    assert a.steps == b.steps > 0 and np.array_equal(a.batch_sizes, b.batch_sizes)
    assert a.batch_frames_used.max() <= 48000 and a.max_resident <= 12
    assert a.samples == b.samples == table.n_samples // 512


@pytest.mark.parametrize("seed", range(6))
def test_a_pad_in_the_steps_done_does_not_consume_the_sample_it_repeats(seed):
    """'pad' fills a rank's last batch with repeats of samples; with length buckets that batch can run before the cut.
    Re-partitioning on another world must still hand out every sample not yet used for real (an elastic run over 41
    utterances once lost one this way)."""
    rgs = groups(LAYOUTS["uneven"], seed=seed)
    pool = RowGroupTable(rgs).n_samples
    spec = PlanSpec(batch_size=2, remainder="pad", buckets=4, window_row_groups=2)
    for epoch in range(4):
        first = plan_all(rgs, spec, world=3, epoch=epoch, seed=seed)
        for cut in range(1, first[0].steps):
            done = np.concatenate([p.sample_ids[: cut * 2][~p.is_pad[: cut * 2]] for p in first])
            rest = [resume_plan(first[0].position_after(cut), rgs, spec, rank=r, world=2) for r in range(2)]
            ahead = np.concatenate([p.sample_ids[~p.is_pad] for p in rest])
            assert sorted(done.tolist() + ahead.tolist()) == list(range(pool)), (epoch, cut)


# ---------------------------------------------------------------------------------------------------------------------
# Regression: the exact plans


def plans_digest(sampler) -> str:
    """Every rank's batches (ids, repeats, draws, order, windows, counts) over both batch rules, both remainders, the
    epoch orders, store weights, and resumes at the same and at another layout, hashed."""
    h = hashlib.sha256()

    def add(plans):
        for p in plans:
            for a in (p.sample_ids, p.entries, p.offsets, p.is_pad.astype(np.int64)):
                h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
            h.update(
                repr(
                    (
                        p.assigned,
                        p.dropped,
                        p.window_steps,
                        p.start_step,
                        [(w.start, w.stop, w.keys) for w in p.windows],
                    )
                ).encode()
            )

    rng = np.random.default_rng(5)
    sizes = LAYOUTS["uneven"]
    rgs = sampler.make_row_groups([rng.integers(20, 2000, size=s) for s in sizes], stores=[i % 2 for i in sizes])
    rules = ({"batch_size": 3}, {"batch_size": 0, "batch_frames": 4000})
    for rule, other in zip(rules, ({"batch_size": 0, "batch_frames": 5000}, {"batch_size": 5})):
        for remainder in ("drop", "pad"):
            for order in (
                {},
                {"sortagrad": True},
                {"reverse": True, "buckets": 4},
                {"shuffle": False},
                {"weights": (1, 3)},
            ):
                spec = sampler.PlanSpec(remainder=remainder, window_row_groups=2, **rule, **order)
                for world in (1, 2, 3):
                    plans = sampler.plan_all(rgs, spec, world=world, epoch=0, seed=world)
                    add(plans)
                    position = plans[0].position_after(plans[0].steps // 2)
                    h.update(json.dumps(position.to_dict(), sort_keys=True).encode())
                    add([sampler.resume_plan(position, rgs, spec, rank=r, world=world) for r in range(world)])
                    spec2 = sampler.PlanSpec(remainder=remainder, window_row_groups=3, **other, **order)
                    add([sampler.resume_plan(position, rgs, spec2, rank=r, world=world + 1) for r in range(world + 1)])
    return h.hexdigest()


def test_plans_are_those_checkpoints_were_made_with():
    """The plans of every layout are pinned: a checkpoint resumes on the batches it was planned with, and a training
    run's samples do not change with a refactoring (recorded with the sampler before fixed and duration batches ran
    through one engine). A deliberate change of plans must change this digest, and say so."""
    import dstrain.loader.sampler as sampler

    assert plans_digest(sampler) == "04bd70378f371d2fcac06801e9d5d14112cd2dec77d487e9ee90171a4323a705"
