"""The streaming loader: the catalog of row groups, batches that follow the plan, stored dtypes kept, bounded
memory, bad shards named."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import synthetic_store

from dstrain.distributed import World
from dstrain.loader.reader import Catalog, PlanReader
from dstrain.loader.sampler import PlanSpec, plan_all, plan_epoch, plan_eval
from dstrain.store import FeatureStore, StoreError


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory) -> str:
    # 53 utterances, shards of 20 rows, row groups of 6: uneven shards and row groups.
    return synthetic_store(tmp_path_factory.mktemp("uneven") / "s", 53, row_group_rows=6, shard_rows=20, seed=1)


def _rows_by_id(url: str) -> dict:
    store = FeatureStore.open(url)
    return {u.id: u for i in range(len(store.manifest.shards)) for u in store.reader(i).utterances()}


def test_catalog_lists_every_row_group_with_its_lengths(uneven_store):
    cat = Catalog.build([FeatureStore.open(uneven_store)], World())
    # 20 + 20 + 13 rows in row groups of 6: 4 + 4 + 3 row groups.
    assert len(cat.refs) == 11 and cat.table.n_samples == 53
    assert [len(f) for f in cat.frames] == [6, 6, 6, 2] * 2 + [6, 6, 1]
    rows = _rows_by_id(uneven_store)
    assert sorted(int(f) for fr in cat.frames for f in fr) == sorted(u.features.shape[0] for u in rows.values())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batches_follow_the_plan_with_stored_features(tmp_path, dtype):
    url = synthetic_store(tmp_path / "s", 30, row_group_rows=4, feature_dtype=dtype, seed=2)
    cat = Catalog.build([FeatureStore.open(url)], World())
    plan = plan_epoch(cat.table, PlanSpec(batch_size=4, window_row_groups=2), rank=1, world=2, epoch=3, seed=7)
    rows = _rows_by_id(url)
    ids = [u for u in sorted(rows)]  # sample id order = store order
    seen = 0
    for step, (x, x_len, y, y_len) in enumerate(PlanReader(cat, plan, threads=3, memory_mb=0.05, prefetch=2)):
        assert x.dtype == np.dtype(dtype)
        for b, sid in enumerate(plan.batch_ids(step)):
            u = rows[ids[sid]]
            assert x_len[b] == len(u.features)
            np.testing.assert_array_equal(x[b, : x_len[b]], u.features)
            assert (x[b, x_len[b] :] == 0).all()
            np.testing.assert_array_equal(y[b, : y_len[b]], u.labels)
            seen += 1
    assert step + 1 == plan.steps and seen == plan.samples > 0


def test_every_rank_runs_the_same_steps_over_an_uneven_store(uneven_store):
    cat = Catalog.build([FeatureStore.open(uneven_store)], World())
    for world in (1, 2, 3, 5, 8):
        plans = plan_all(cat.table, PlanSpec(batch_size=4, remainder="pad"), world=world, epoch=0, seed=0)
        steps = {sum(1 for _ in PlanReader(cat, p, threads=2)) for p in plans}
        assert steps == {plans[0].steps}
        covered = set(np.concatenate([p.sample_ids for p in plans]).tolist())
        assert covered == set(range(53))


def test_eval_plan_reads_each_sample_once(uneven_store):
    cat = Catalog.build([FeatureStore.open(uneven_store)], World())
    got = []
    for rank in range(3):
        plan = plan_eval(cat.table, rank=rank, world=3, batch_size=5, sort_by_length=True)
        for x, x_len, y, y_len in PlanReader(cat, plan):
            got += x_len.tolist()
    assert sorted(got) == sorted(int(f) for fr in cat.frames for f in fr)


def test_transform_is_applied_per_sample_deterministically(tmp_path):
    from augment_reference import Augmenter

    from dstrain.augment.loader import sample_rng

    url = synthetic_store(tmp_path / "s", 12, row_group_rows=4, seed=3)
    cat = Catalog.build([FeatureStore.open(url)], World())
    plan = plan_epoch(cat.table, PlanSpec(batch_size=3), rank=0, world=1, epoch=0, seed=0)
    aug = Augmenter.from_specs(["frequency_mask[n=1,size=5]"])

    def run():
        t = lambda x, sid, labels: aug.apply(x, sample_rng(0, 0, sid))  # noqa: E731
        return [b[0].copy() for b in PlanReader(cat, plan, threads=3, transform=t)]

    a, b = run(), run()
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    plain = [b[0] for b in PlanReader(cat, plan)]
    assert not all(np.array_equal(p, q) for p, q in zip(a, plain))


def _damage(url: str, how: str) -> str:
    shard = sorted(p for p in os.listdir(url) if p.endswith(".parquet"))[1]
    path = os.path.join(url, shard)
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip bits inside the first data page of the features column
        import pyarrow.parquet as pq

        start = pq.ParquetFile(path).metadata.row_group(0).column(6).data_page_offset + 64
        for i in range(start, start + 40):
            data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))
    return shard


def test_truncated_shard_is_refused_before_the_first_step(tmp_path):
    url = synthetic_store(tmp_path / "s", 30, row_group_rows=5, shard_rows=10, seed=4)
    shard = _damage(url, "truncate")
    with pytest.raises(StoreError, match=f"{shard}.*dstrain shards info.*--skip_bad_shards"):
        Catalog.build([FeatureStore.open(url)], World())
    cat = Catalog.build([FeatureStore.open(url)], World(), skip_bad_shards=True)
    assert len(cat.skipped) == 1 and shard in cat.skipped[0] and cat.table.n_samples == 20


def test_bit_flipped_shard_fails_at_read_time_naming_it(tmp_path):
    url = synthetic_store(tmp_path / "s", 30, row_group_rows=5, shard_rows=10, seed=5)
    shard = _damage(url, "flip")
    cat = Catalog.build([FeatureStore.open(url)], World())  # same size: only reading tells
    plan = plan_epoch(cat.table, PlanSpec(batch_size=5, shuffle=False), rank=0, world=1, epoch=0, seed=0)
    with pytest.raises(StoreError, match=shard):
        for _ in PlanReader(cat, plan):
            pass
    reader = PlanReader(cat, plan, skip_bad=True)
    batches = list(reader)
    assert len(batches) == plan.steps and reader.bad_keys
    assert sum(len(b[1]) for b in batches) == 30 - 5 * len(reader.bad_keys)


MEMORY_PROBE = textwrap.dedent("""
    import json, os, sys, threading, time
    from dstrain.distributed import World
    from dstrain.loader.reader import Catalog, PlanReader
    from dstrain.loader.builder import window_row_groups
    from dstrain.loader.sampler import PlanSpec, plan_epoch
    from dstrain.store import FeatureStore
    url, budget, frames = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    cat = Catalog.build([FeatureStore.open(url)], World())
    spec = PlanSpec(batch_size=0 if frames else 4, batch_frames=frames,
                    window_row_groups=window_row_groups(cat, budget))
    plan = plan_epoch(cat.table, spec, rank=0, world=1, epoch=0, seed=0)
    def rss():  # resident now, in MiB (ru_maxrss is a high-water mark the imports may already have set)
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    base, peak, done = rss(), [0.0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    threading.Thread(target=sample, daemon=True).start()
    reader = PlanReader(cat, plan, threads=4, memory_mb=budget, prefetch=2)
    frames = 0
    for b in reader:
        frames += int(b[1].sum())
        time.sleep(0.01)  # a training step: lets the prefetch run ahead as far as it may
    done.set()
    print(json.dumps({"frames": frames, "delta_mb": peak[0] - base, "resident_peak_mb": reader.resident_peak / 2**20}))
""")

# What a rank holds besides the row groups it counts: Arrow's read buffers and decompression, queued batches,
# thread stacks and allocator slack. Documented in docs/training.md next to --loader_memory_mb.
LOADER_OVERHEAD_MB = 48


@pytest.mark.parametrize("frames", [0, 6000], ids=["fixed", "batch_frames"])
def test_memory_stays_bounded_on_a_store_much_larger_than_the_budget(tmp_path, frames):
    # 240 utterances of ~1000 frames x 40 float32: ~38 MiB of features, 5x+ the 6 MiB budget.
    url = synthetic_store(tmp_path / "big", 240, row_group_rows=4, shard_rows=60, frames=(900, 1100), seed=6)
    store_mb = sum(s.frames for s in FeatureStore.open(url).manifest.shards) * 40 * 4 / 2**20
    budget = 6.0
    assert store_mb > 5 * budget

    def probe(mb: float) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, url, str(mb), str(frames)], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    bounded, unbounded = probe(budget), probe(4 * store_mb)
    assert bounded["frames"] == unbounded["frames"]
    assert bounded["resident_peak_mb"] <= budget + 1.0  # + at most one row group beyond the budget
    assert bounded["delta_mb"] < budget + LOADER_OVERHEAD_MB, bounded
    # The measurement can tell: holding the whole store costs visibly more.
    assert unbounded["delta_mb"] > bounded["delta_mb"] + store_mb / 2, (bounded, unbounded)


def test_ldc93s1_batch(ldc93s1_store):
    cat = Catalog.build([FeatureStore.open(ldc93s1_store)], World())
    plan = plan_epoch(cat.table, PlanSpec(batch_size=4, remainder="pad"), rank=0, world=2, epoch=0, seed=0)
    ((x, x_len, y, y_len),) = list(PlanReader(cat, plan))
    assert x.shape == (4, 145, 40) and x_len.tolist() == [145] * 4  # one utterance, padded to a batch of 4
    text = FeatureStore.open(ldc93s1_store).manifest.get_alphabet().decode(y[0, : y_len[0]])
    assert text == "she had your dark suit in greasy wash water all year" and np.isfinite(x).all()


# ---------------------------------------------------------------------------------------------------------------------
# The input builder


def _train_input(url, batch_size=4, **loader):
    from conftest import DATA

    from dstrain.alphabet import Alphabet
    from dstrain.loader.builder import TrainInput
    from dstrain.loader.config import LoaderConfig

    return TrainInput.build(
        [url],
        Alphabet.from_file(str(DATA / "alphabet.txt")),
        LoaderConfig(**loader),
        World(),
        batch_size=batch_size,
        seed=3,
        epochs=2,
    )


def test_augmentation_keeps_every_sample_long_enough_for_ctc(tmp_path):
    from dstrain.alphabet import ctc_min_frames

    # Tempo x8 would leave 4-5 frames of utterances whose transcripts need up to ~20.
    url = synthetic_store(tmp_path / "s", 24, frames=(30, 40), seed=5)
    data = _train_input(url, augment=("tempo[factor=8]",))
    augment = data.device_augmenter()
    shortened = 0
    for x, x_len, y, y_len, keys in data.reader(0):
        x_len = augment(x, x_len, y, y_len, keys)[1].numpy()
        for n, labels in zip(x_len.tolist(), (y[i, : y_len[i]] for i in range(len(y_len)))):
            need = ctc_min_frames(labels.tolist())
            assert n >= need
            shortened += n < 30
    assert shortened > 12  # the augmentation did act: most got shorter than any stored utterance
    data.close()


@pytest.mark.parametrize("loader", [{}, {"batch_frames": 600}], ids=["fixed", "batch_frames"])
def test_train_input_state_resumes_mid_epoch(tmp_path, loader):
    url = synthetic_store(tmp_path / "s", 40, row_group_rows=4, seed=6)
    data = _train_input(url, **loader)
    full = [b[1].tolist() for b in data.reader(0)]
    data.end_epoch()
    data = _train_input(url, **loader)
    reader = data.reader(0)
    for _, batch in zip(range(3), reader):
        data.step_done()
    state = data.state_dict()
    reader.close()
    assert state["position"]["step"] == 3
    assert ("batch_frames" in json.dumps(state)) == bool(loader)
    again = _train_input(url, **loader)
    again.load_state_dict(state)
    rest = again.reader(0)
    assert rest.plan.start_step == 3 and rest.plan.exact
    assert [b[1].tolist() for b in rest] == full[3:]
    again.end_epoch()
    assert again.state_dict() == {"position": None}


def test_batch_frames_hold_after_tempo_lengthens_utterances(tmp_path):
    # Tempo 0.8 plays slower: every utterance gets 1.25x its stored frames, so batches are planned to 800 / 1.25.
    url = synthetic_store(tmp_path / "s", 40, row_group_rows=4, frames=(60, 200), seed=7)
    data = _train_input(url, batch_frames=800, augment=("tempo[factor=0.8]",))
    assert data.spec.batch_frames == 640 and data.spec.batch_size == 0
    augment = data.device_augmenter()
    shapes = [x.shape[0] * x.shape[1] for x in (augment(*batch)[0] for batch in data.reader(0))]
    assert len(shapes) == data.plan.steps and max(shapes) <= 800
    assert max(shapes) > 640, "tempo did not lengthen the batches: the test would not tell"
    assert max(data.plan.batch_sizes) > 2 * min(data.plan.batch_sizes)  # short utterances come many to a batch
    data.close()
    plain = _train_input(url, batch_frames=800)
    assert plain.spec.batch_frames == 800
    plain.close()


def test_batch_frames_smaller_than_an_utterance_is_one_clear_error(tmp_path):
    url = synthetic_store(tmp_path / "s", 30, frames=(60, 200), seed=8)
    longest = max(int(f) for fr in Catalog.build([FeatureStore.open(url)], World()).frames for f in fr)
    with pytest.raises(ValueError) as e:
        _train_input(url, batch_frames=150)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--batch_frames 150: ")
    assert (
        f"the longest has {longest} frames ({longest * 0.02:.1f} s); raise --batch_frames to at least {longest}"
        in message
    )
    assert "dstrain preprocess --max_duration" in message
    with pytest.raises(ValueError, match=r"lengthens utterances up to 1.25x: 160 frames planned"):
        _train_input(url, batch_frames=200, augment=("tempo[factor=0.8]",))


@pytest.mark.parametrize(
    "spec", [{"batch_size": 16}, {"batch_size": 0, "batch_frames": 12000}], ids=["batch", "frames"]
)
def test_reader_keeps_the_budget_when_windows_are_a_step_or_two(tmp_path, spec):
    # Windows of 2 row groups (8 rows) hold 1 batch of 16 or a few of ~11: batches in flight span several windows,
    # whose row groups the reader must let go of before it loads more.
    from dstrain.loader.builder import window_row_groups

    url = synthetic_store(tmp_path / "s", 96, row_group_rows=4, frames=(900, 1100), seed=9)
    cat = Catalog.build([FeatureStore.open(url)], World())
    budget, row_group = 3.0, max(cat.nbytes(k) for k in range(len(cat.refs))) / 2**20
    plan = plan_epoch(
        cat.table, PlanSpec(window_row_groups=window_row_groups(cat, budget), **spec), rank=0, world=1, epoch=0, seed=0
    )
    assert plan.window_steps <= 2
    reader = PlanReader(cat, plan, threads=4, memory_mb=budget, prefetch=2)
    assert sum(len(b[1]) for b in reader) == plan.samples
    assert reader.resident_peak / 2**20 <= budget + row_group
