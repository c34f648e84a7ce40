"""Augmentation on the device (dstrain/augment/device.py): the numpy ops of augment_reference.py are the reference.
Where an op draws nothing the two agree value for value; where it draws, the device's numbers are its own, so the
tests check what the spec says (widths, rates, bounds, probabilities) and that a sample's result depends on (seed,
epoch, sample id) alone: not on its batch-mates, its padding or the number of ranks."""

import numpy as np
import pytest
import tensorflow as tf
from augment_reference import Augmenter
from augment_reference import bilinear as _bilinear
from augment_reference import cubic_weights as _cubic_weights

from dstrain.augment.device import DeviceAugmenter, _cubic_taps, ctc_min_frames
from dstrain.augment.device import _bilinear as device_bilinear
from dstrain.augment.filterbank import (
    DEFAULT_AUGMENT,
    DEVICE_OPS,
    FILTERBANK_OPS,
    FLOOR_LOG,
    LOADER_ONLY,
    parse_augmentations,
    split_ops,
)
from dstrain.augment.loader import sample_rng
from dstrain.features import FeatureConfig

N_MEL = FeatureConfig().n_mel
SILENCE = FLOOR_LOG
# Every op that runs on the device, none with fill=mean (the one whose float sum may round differently with padding).
ALL_OPS = [
    "volume[gain=0~6]",
    "frequency_mask[n=2,size=4~3]",
    "time_mask[n=2,size=120~80]",
    "dropout[rate=0.1]",
    "add[stddev=0.3]",
    "multiply[stddev=0.1,domain=spectrogram]",
    "pitch",
    "tempo[factor=1~0.2]",
    "warp[nt=3,nf=2,wt=0.2,wf=0.1]",
]


def speech(n_frames: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(-2.0, 1.5, (n_frames, N_MEL)).astype(dtype)


def augment(specs, xs, ids=None, *, seed=0, epoch=0, epochs=2, labels=None, pad_to=0, **kw):
    """Each utterance of ``xs`` augmented as one padded batch: a list of [T', n_mel] arrays."""
    aug = DeviceAugmenter(parse_augmentations(specs), seed, epochs, **kw)
    lengths = np.array([len(x) for x in xs], np.int32)
    batch = np.zeros((len(xs), max([pad_to, *lengths]), N_MEL), xs[0].dtype)
    for i, x in enumerate(xs):
        batch[i, : len(x)] = x
    labels = labels if labels is not None else [[1]] * len(xs)
    y = np.zeros((len(xs), max(len(lab) for lab in labels)), np.int32)
    for i, lab in enumerate(labels):
        y[i, : len(lab)] = lab
    ids = range(len(xs)) if ids is None else ids
    keys = np.array([[epoch, i] for i in ids], np.int64).reshape(-1, 2)
    out, n = aug(batch, lengths, y, np.array([len(lab) for lab in labels], np.int32), keys)
    out, n = out.numpy(), n.numpy()
    assert out.dtype == np.float32 and out.shape[0] == len(xs) and out.shape[1] == max([0, *n])
    assert all((out[i, k:] == 0).all() for i, k in enumerate(n)), "padding frames must be zero"
    return [out[i, : n[i]] for i in range(len(xs))]


# ---------------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize(
    "spec",
    [
        "tempo[factor=1.25]",
        "tempo[factor=0.8]",
        "tempo[factor=0.5,max_time=1000]",
        "tempo[factor=1.7]",
        "pitch[pitch=1.3]",
        "pitch[pitch=0.6]",
        "volume[gain=6]",
        "volume[gain=-600]",
        "time_mask[n=1,size=100000]",
        "frequency_mask[n=1,size=1000]",
        "add[stddev=0]",
        "warp[nt=0,wt=1]",
        "warp[nt=3,wt=0,wf=0]",
    ],
)
def test_ops_that_draw_nothing_match_the_reference(spec):
    xs = [speech(300, 1), speech(200, 2), speech(3, 3), speech(1, 4)]
    xs[0][:7] = SILENCE  # silence stays silent under a gain
    got = augment([spec, "frequency_mask[n=0]"], xs)
    for i, x in enumerate(xs):
        want = Augmenter.from_specs([spec]).apply(x, sample_rng(0, 0, i), 0.0)
        assert got[i].shape == want.shape
        np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_a_chain_matches_the_reference_in_float16():
    # Power and log conversions between ops, float16 in: as the reference does it, up to float rounding.
    specs = ["volume[gain=3]", "pitch[pitch=1.1]", "tempo[factor=0.9]", "time_mask[n=1,size=100000,domain=features]"]
    xs = [speech(120, 5, np.float16), speech(80, 6, np.float16)]
    got = augment(specs, xs)
    for i, x in enumerate(xs):
        want = Augmenter.from_specs(specs).apply(x, sample_rng(0, 0, i), 0.0).astype(np.float32)
        np.testing.assert_allclose(got[i], want, atol=2e-3)  # float16's step at |log mel| ~ 4


@pytest.mark.parametrize("n_in, n_out", [(3, 1), (3, 2), (3, 50), (6, 7), (10, 400), (4, 4)])
def test_cubic_taps_are_the_references_upsampling_matrix(n_in, n_out):
    # Two samples, the second with more output positions than it has: its taps are computed anyway, unused.
    taps = _cubic_taps(
        tf.constant([n_in, n_in], tf.float64),
        tf.constant([n_out, n_out + 9], tf.float64),
        tf.range(n_out, dtype=tf.float64),
    )
    dense = np.zeros((n_out, n_in))
    for index, weight in taps:
        np.add.at(dense, (np.arange(n_out), index.numpy()[0]), weight.numpy()[0])
    np.testing.assert_allclose(dense, _cubic_weights(n_in, n_out), atol=1e-6)


def test_bilinear_sampling_matches_the_reference_per_sample_and_ignores_padding():
    rng = np.random.default_rng(0)
    a, b = np.exp(speech(30, 1)), np.exp(speech(17, 2))
    batch = np.zeros((2, 30, N_MEL), np.float32)
    batch[0], batch[1, :17] = a, b
    batch[1, 17:] = 1e9  # padding must never be read
    qt = rng.uniform(-3, 33, (2, 30, N_MEL)).astype(np.float32)
    qf = rng.uniform(-3, N_MEL + 2, (2, 30, N_MEL)).astype(np.float32)
    got = device_bilinear(tf.constant(batch), tf.constant(qt), tf.constant(qf), tf.constant([30, 17])).numpy()
    np.testing.assert_allclose(got[0], _bilinear(a, qt[0], qf[0]), rtol=1e-5)
    np.testing.assert_allclose(got[1, :17], _bilinear(b, qt[1, :17], qf[1, :17]), rtol=1e-5)
    assert got[1].max() < 1e6


# ---------------------------------------------------------------------------------------------------- determinism


def test_a_sample_depends_on_seed_epoch_and_id_alone():
    xs = [speech(150, i) for i in range(4)]
    first = augment(ALL_OPS, xs, ids=[10, 11, 12, 13], seed=5, epoch=1)
    again = augment(ALL_OPS, xs, ids=[10, 11, 12, 13], seed=5, epoch=1)
    assert all(np.array_equal(p, q) for p, q in zip(first, again))
    # Alone, in another order, among other utterances, padded far longer: the same, bit for bit.
    alone = augment(ALL_OPS, [xs[2]], ids=[12], seed=5, epoch=1)[0]
    assert np.array_equal(alone, first[2])
    mixed = augment(ALL_OPS, [speech(400, 9), xs[3], xs[1]], ids=[99, 13, 11], seed=5, epoch=1, pad_to=700)
    assert np.array_equal(mixed[1], first[3]) and np.array_equal(mixed[2], first[1])
    for changed in (
        {"ids": [10, 11, 14, 13], "seed": 5, "epoch": 1},
        {"ids": [10, 11, 12, 13], "seed": 6, "epoch": 1},
        {"ids": [10, 11, 12, 13], "seed": 5, "epoch": 0},
    ):
        other = augment(ALL_OPS, xs, **changed)[2]
        assert other.shape != first[2].shape or not np.array_equal(other, first[2])


def test_the_default_set_is_batch_independent_up_to_the_mean_fills_rounding():
    xs = [speech(200, i) for i in range(3)]
    together = augment(DEFAULT_AUGMENT, xs, ids=[7, 8, 9], seed=1)
    for i in range(3):
        alone = augment(DEFAULT_AUGMENT, [xs[i]], ids=[7 + i], seed=1, pad_to=333)[0]
        assert alone.shape == together[i].shape
        np.testing.assert_allclose(alone, together[i], atol=1e-5)


def test_a_sample_is_augmented_alike_on_one_rank_or_three(tmp_path):
    # Through the loader: the plans of 1 and 3 ranks put each sample in other batches, with other padding.
    from conftest import synthetic_store

    from dstrain.distributed import World
    from dstrain.loader.reader import Catalog, PlanReader
    from dstrain.loader.sampler import PlanSpec, plan_all
    from dstrain.store import FeatureStore

    url = synthetic_store(tmp_path / "s", 30, row_group_rows=4, frames=(40, 120), seed=3)
    cat = Catalog.build([FeatureStore.open(url)], World())
    aug = DeviceAugmenter(parse_augmentations(ALL_OPS), seed=4, epochs=3)
    by_world = {}
    for world in (1, 3):
        seen = {}
        for plan in plan_all(cat.table, PlanSpec(batch_size=4, remainder="pad"), world=world, epoch=1, seed=4):
            for x, n, y, m, keys in PlanReader(cat, plan, keys=True):
                assert (keys[:, 0] == 1).all() and keys.shape == (len(n), 2)
                out, n_out = aug(x, n, y, m, keys)
                for sid, row, k in zip(keys[:, 1].tolist(), out.numpy(), n_out.numpy()):
                    seen[sid] = row[:k]
        by_world[world] = seen
    assert sorted(by_world[1]) == sorted(by_world[3]) == list(range(30))
    assert all(np.array_equal(by_world[1][s], by_world[3][s]) for s in range(30))


# ---------------------------------------------------------------------------------------------------- what specs say


def masked_rows(y: np.ndarray, value: float = SILENCE) -> np.ndarray:
    return np.all(y == value, axis=1)


def runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def test_frequency_masks_are_bands_within_their_bounds_with_probability_p():
    xs = [speech(60, i) for i in range(400)]
    got = augment(["frequency_mask[p=0.8,n=1,size=4~3]"], xs)
    widths, starts, applied = [], [], 0
    for x, y in zip(xs, got):
        cols = np.all(y == SILENCE, axis=0)
        assert np.array_equal(y[:, ~cols], x[:, ~cols])
        if cols.any():
            applied += 1
            (w,) = runs(cols)  # one contiguous band
            widths.append(w)
            starts.append(int(np.argmax(cols)))
    assert 0.74 < applied / 400 < 0.86
    # size 4~3: uniform in [1, 7], rounded half to even -> 1..7, the ends half as often
    assert min(widths) == 1 and max(widths) == 7 and abs(np.mean(widths) - 4) < 0.3
    assert min(starts) == 0 and max(starts) > N_MEL - 10  # the whole band range is reachable


def test_time_masks_have_the_widths_and_count_the_spec_gives():
    xs = [speech(300, i) for i in range(300)]
    # 20 ms frames: 40..200 ms truncates to 2..10 frames (10 only at exactly 200 ms: in practice 2..9)
    got = augment(["time_mask[n=1,size=120~80]"], xs)
    widths = [w for y in got for w in runs(masked_rows(y))]
    assert len(widths) == 300 and min(widths) == 2 and max(widths) == 9 and abs(np.mean(widths) - 5.5) < 0.3
    starts = [int(np.argmax(masked_rows(y))) for y in got]
    assert min(starts) < 15 and max(starts) > 280 and abs(np.mean(starts) - 145) < 15  # uniform over the utterance
    # n=3~1 masks (2 to 4 of them), each 5 frames; overlapping ones merge
    counts = [masked_rows(y).sum() for y in augment(["time_mask[n=3~1,size=100]"], xs[:100])]
    assert min(counts) >= 5 and max(counts) == 20 and 10 in counts and 13.5 < np.mean(counts) < 16


def test_mask_widths_follow_the_clock_and_keep_a_frame():
    x = [speech(40, 0)]
    for epoch, frames in ((0, 1), (1, 5), (2, 10)):  # size 20:200 ms over 3 epochs: clock 0, 0.5, 1
        assert masked_rows(augment(["time_mask[n=1,size=20:200]"], x, epoch=epoch, epochs=3)[0]).sum() == frames
    (y,) = augment(["time_mask[n=1,size=100000]"], [speech(3, 0)])
    assert masked_rows(y).sum() == 2
    (y,) = augment(["time_mask[n=1,size=100]"], [speech(1, 0)])
    assert y.shape == (1, N_MEL)


def test_fill_mean_is_the_utterances_own_channel_mean():
    # A long padded neighbour: the mean must come from this utterance's frames only.
    x = speech(50, 3) + 4.0
    y = augment(["time_mask[n=1,size=100,fill=mean]"], [x, speech(300, 4)])[0]
    rows = np.flatnonzero(np.any(y != x, axis=1))
    assert len(rows) == 5
    np.testing.assert_allclose(y[rows], np.broadcast_to(x.mean(axis=0), (5, N_MEL)), rtol=1e-5)
    y = augment(["frequency_mask[n=1,size=3,fill=mean]"], [x, speech(300, 4)])[0]
    cols = np.flatnonzero(np.any(y != x, axis=0))
    assert len(cols) == 3
    np.testing.assert_allclose(y[:, cols], np.broadcast_to(x[:, cols].mean(axis=0), (50, 3)), rtol=1e-5)


def test_dropout_add_and_multiply_rates_and_spreads():
    x = speech(1000, 0)
    (y,) = augment(["dropout[rate=0.3]"], [x])
    dropped = y == SILENCE
    assert abs(dropped.mean() - 0.3) < 0.01
    np.testing.assert_allclose(y[~dropped], x[~dropped], rtol=1e-5)
    (y,) = augment(["dropout[rate=0.1,domain=features]"], [x])
    assert abs((y == 0).mean() - 0.1) < 0.01
    d = augment(["add[stddev=0.5]"], [x])[0] - x
    assert abs(d.std() - 0.5) < 0.01 and abs(d.mean()) < 0.01
    assert abs(np.mean(np.abs(d) < 0.5) - 0.6827) < 0.01  # normal, not just the right spread
    const = np.full((1000, N_MEL), 2.0, np.float32)
    ratio = augment(["multiply[stddev=0.2]"], [const])[0] / const
    assert abs(ratio.mean() - 1.0) < 0.01 and abs(ratio.std() - 0.2) < 0.01
    (y,) = augment(["add[stddev=100,domain=spectrogram]"], [x])
    assert np.isfinite(y).all() and y.min() == pytest.approx(SILENCE, abs=1e-4)
    # per-sample radius: add[stddev=0.5~0.25] spreads within [0.25, 0.75]
    stds = [float(np.std(y - x[:200])) for y in augment(["add[stddev=0.5~0.25]"], [x[:200]] * 40)]
    assert 0.24 < min(stds) < 0.35 and 0.65 < max(stds) < 0.76


def test_tempo_lengths_bounds_probability_and_ctc_minimum():
    xs = [speech(200, i) for i in range(300)]
    lengths = [len(y) for y in augment(["tempo[p=0.5,factor=1~0.1]"], xs)]
    changed = [n for n in lengths if n != 200]
    assert 0.42 < len(changed) / 300 < 0.58
    assert int(200 / 1.1) <= min(changed) < 186 and 218 < max(changed) <= int(200 / 0.9)
    # never shorter than the transcript needs (labels + repeated neighbours), nor than one frame
    labels = [[3, 3, 4, 5, 5, 5], [1] * 30, [2]]
    got = augment(["tempo[factor=100]"], [speech(300, 0), speech(300, 1), speech(3, 2)], labels=labels)
    assert [len(y) for y in got] == [9, 59, 1]
    assert ctc_min_frames(tf.constant([[3, 3, 4, 9], [1, 2, 0, 0]]), tf.constant([3, 2])).numpy().tolist() == [4, 2]


def test_warp_keeps_edges_and_moves_the_inside():
    xs = [speech(200, i) for i in range(20)]
    got = augment(["warp[nt=4,nf=3,wt=0.5,wf=0.5]"], xs)
    for x, y in zip(xs, got):
        assert y.shape == x.shape
        np.testing.assert_allclose(y[[0, -1]], x[[0, -1]], atol=1e-4)  # zero flow at all edges
        np.testing.assert_allclose(y[:, [0, -1]], x[:, [0, -1]], atol=1e-4)
        assert np.abs(y[50:150, 10:30] - x[50:150, 10:30]).mean() > 0.1
    # A larger wt moves more.
    mild = np.mean([np.abs(y - x).mean() for x, y in zip(xs, augment(["warp[nt=4,wt=0.05]"], xs))])
    strong = np.mean([np.abs(y - x).mean() for x, y in zip(xs, augment(["warp[nt=4,wt=0.5]"], xs))])
    assert 0 < mild < strong


def test_pitch_moves_a_peak_where_the_reference_does():
    peak = np.full((10, N_MEL), -6.0, np.float32)
    peak[:, 12] = 2.0
    for factor in (0.8, 1.5):
        want = Augmenter.from_specs([f"pitch[pitch={factor}]"]).apply(peak, sample_rng(0, 0, 0), 0.0)
        (got,) = augment([f"pitch[pitch={factor}]"], [peak])
        assert np.argmax(got[0]) == np.argmax(want[0]) != 12


def test_probability_zero_and_one():
    xs = [speech(50, i) for i in range(50)]
    assert all(np.array_equal(y, x) for x, y in zip(xs, augment(["add[p=0,stddev=1]"], xs)))
    assert not any(np.array_equal(y, x) for x, y in zip(xs, augment(["add[p=1,stddev=1]"], xs)))


def test_draws_are_uniform():
    # The element-wise draws of dropout at 64 rates: each rate's dropped fraction within 0.3 % of it.
    x = [speech(500, 0)]
    for rate in np.linspace(0.01, 0.99, 64):
        (y,) = augment([f"dropout[rate={rate}]"], x)
        assert abs((y == SILENCE).mean() - rate) < 0.015


# ---------------------------------------------------------------------------------------------------- the split


def test_the_loader_keeps_overlay_and_whatever_runs_before_it():
    noise = {"n": lambda rng, n: np.zeros((n, N_MEL), np.float32)}
    ops = parse_augmentations(["time_mask", "volume", "overlay[source=n]", "volume", "tempo"], noise)
    loader, device = split_ops(ops)
    # sample ops first (volume, overlay, volume in command-line order), then spectrogram ones
    assert [a.name for a in loader] == ["volume", "overlay"]
    assert [a.name for a in device] == ["volume", "time_mask", "tempo"]
    assert split_ops(parse_augmentations(DEFAULT_AUGMENT))[0] == []
    # every op runs on one side or the other
    assert sorted(DEVICE_OPS + LOADER_ONLY) == sorted(FILTERBANK_OPS) and not set(DEVICE_OPS) & set(LOADER_ONLY)
    with pytest.raises(ValueError, match="overlay.*cannot run on the device"):
        DeviceAugmenter(ops, seed=0, epochs=1)


def test_the_device_implements_exactly_the_ops_declared_to_run_there():
    from dstrain.augment import device
    from dstrain.augment.filterbank import OPS

    assert {cls.name for cls in device._OPS} == {n for n, cls in OPS.items() if "device" in cls.RUNS}
    assert set(DEVICE_OPS) == {cls.name for cls in device._OPS}


def test_an_empty_batch_and_a_traced_step():
    aug = DeviceAugmenter(parse_augmentations(list(DEFAULT_AUGMENT) + ALL_OPS), seed=0, epochs=1)
    spec = (
        tf.TensorSpec([None, None, N_MEL], tf.float16),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, None], tf.int32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, 2], tf.int64),
    )
    step = tf.function(aug, input_signature=spec)
    out, n = step(
        np.zeros((0, 1, N_MEL), np.float16),
        np.zeros(0, np.int32),
        np.zeros((0, 1), np.int32),
        np.zeros(0, np.int32),
        np.zeros((0, 2), np.int64),
    )
    assert out.shape[0] == 0 and n.shape == (0,)
    x = speech(90, 1, np.float16)[None]
    out, n = step(
        x, np.array([90], np.int32), np.array([[1]], np.int32), np.array([1], np.int32), np.array([[0, 3]], np.int64)
    )
    assert np.isfinite(out.numpy()).all() and out.shape[1] == n.numpy()[0]
    with pytest.raises(ValueError, match=f"log mel \\[batch, frames, {N_MEL}\\]"):
        aug(np.zeros((1, 5, 13), np.float32), [5], [[1]], [1], [[0, 0]])
