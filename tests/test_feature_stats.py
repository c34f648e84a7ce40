import dataclasses
import json

import numpy as np
import pytest

from dstrain.store.stats import FeatureStats

C = 40


def _utterances(seed: int = 0, n: int = 37) -> list[np.ndarray]:
    """Log-mel-like frames: large per-channel offsets, small spread (hard for naive sum-of-squares)."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(-25.0, 5.0, C)
    scale = rng.uniform(0.01, 3.0, C)
    return [offset + scale * rng.standard_normal((int(rng.integers(0, 120)), C)) for _ in range(n)]


def _assert_matches_numpy(stats: FeatureStats, frames: np.ndarray) -> None:
    ref = frames.astype(np.float64)
    assert stats.count == ref.shape[0]
    np.testing.assert_allclose(stats.mean, ref.mean(axis=0), rtol=1e-9, atol=0)
    np.testing.assert_allclose(stats.variance, ref.var(axis=0), rtol=1e-9, atol=0)
    np.testing.assert_allclose(stats.std(), ref.std(axis=0), rtol=1e-9, atol=0)


def test_single_chunk_matches_numpy():
    x = _utterances()[1]
    _assert_matches_numpy(FeatureStats.from_features(x), x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_order_and_partition_matches_concatenation(seed):
    utts = _utterances(seed)
    frames = np.concatenate(utts)
    rng = np.random.default_rng(100 + seed)
    per_utt = [FeatureStats.from_features(u) for u in utts]

    results = []
    # Per utterance, left fold in order and in a shuffled order.
    left = FeatureStats.empty()
    for s in per_utt:
        left = left.merge(s)
    results.append(left)
    right = FeatureStats.empty()
    for s in reversed(per_utt):
        right = s.merge(right)
    results.append(right)
    results.append(FeatureStats.merge_all(per_utt[i] for i in rng.permutation(len(per_utt))))
    # Uneven chunks of frames (as work chunks), grouped into "ranks", merged rank by rank.
    cuts = np.sort(rng.choice(np.arange(1, len(frames)), size=9, replace=False))
    chunks = [FeatureStats.from_features(c) for c in np.split(frames, cuts)]
    ranks = [FeatureStats.merge_all(chunks[r::3]) for r in range(3)]
    results.append(FeatureStats.merge_all(ranks[::-1]))
    results.append(FeatureStats.from_features(frames))

    for stats in results:
        _assert_matches_numpy(stats, frames)
    for stats in results[1:]:  # and with each other, to float64 rounding
        np.testing.assert_allclose(stats.mean, results[0].mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(stats.m2, results[0].m2, rtol=1e-11, atol=0)


def test_single_frames_merged():
    x = _utterances(seed=4)[0]
    merged = FeatureStats.merge_all(FeatureStats.from_features(x[i : i + 1]) for i in range(len(x)))
    _assert_matches_numpy(merged, x)


def test_empty_is_identity():
    s = FeatureStats.from_features(_utterances()[2])
    for empty in (FeatureStats.empty(), FeatureStats.empty(C), FeatureStats.from_features(np.zeros((0, C)))):
        assert empty.count == 0
        assert empty.merge(s) == s
        assert s.merge(empty) == s
    assert FeatureStats.merge_all([]) == FeatureStats.empty()
    assert FeatureStats.merge_all([FeatureStats.empty(), s, FeatureStats.empty(C)]) == s
    assert FeatureStats.empty().merge(FeatureStats.empty(C)) == FeatureStats.empty(C)
    with pytest.raises(ValueError, match="variance of no frames"):
        FeatureStats.empty(C).variance


def test_json_round_trip_is_exact():
    s = FeatureStats.merge_all(FeatureStats.from_features(u) for u in _utterances(seed=7))
    d = json.loads(json.dumps(s.to_dict()))
    assert isinstance(d["count"], int) and all(type(v) is float for v in d["mean"] + d["m2"])
    back = FeatureStats.from_dict(d)
    assert back == s
    assert back.mean.tobytes() == s.mean.tobytes() and back.m2.tobytes() == s.m2.tobytes()
    awkward = FeatureStats(3, [0.1, 1 / 3, -1e-300, 5e-324, -0.0, 2.0**60 + 1], [0.0, 1e308, 1e-310, 0.7, 2 / 3, 1.5])
    assert FeatureStats.from_dict(json.loads(json.dumps(awkward.to_dict()))).mean.tobytes() == awkward.mean.tobytes()
    empty = FeatureStats.from_dict(json.loads(json.dumps(FeatureStats.empty(C).to_dict())))
    assert empty == FeatureStats.empty(C)


def test_float16_features_are_computed_in_float64():
    x16 = _utterances(seed=3)[5].astype(np.float16)
    s = FeatureStats.from_features(x16)
    assert s.mean.dtype == np.float64 and s.m2.dtype == np.float64
    _assert_matches_numpy(s, x16)  # numpy reference on x16.astype(float64)
    halves = FeatureStats.from_features(x16[:10]).merge(FeatureStats.from_features(x16[10:]))
    _assert_matches_numpy(halves, x16)
    # float16 accumulation would be far off; this is the exact float64 answer.
    assert not np.allclose(x16.mean(axis=0, dtype=np.float16), s.mean, rtol=1e-6)


def test_frozen_and_validated():
    s = FeatureStats.from_features(np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(s.mean, [2.0, 3.0])
    np.testing.assert_array_equal(s.variance, [8 / 3, 8 / 3])
    np.testing.assert_array_equal(FeatureStats.from_features(np.ones((4, 2))).std(floor=1e-3), [1e-3, 1e-3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.count = 5
    with pytest.raises(ValueError):
        s.mean[0] = 1.0  # read-only
    with pytest.raises(ValueError, match="cannot merge statistics of 2 and 3 channels"):
        s.merge(FeatureStats.from_features(np.ones((2, 3))))
    with pytest.raises(ValueError, match="non-finite"):
        FeatureStats.from_features(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[frames, channels\]"):
        FeatureStats.from_features(np.ones(4))
    with pytest.raises(ValueError, match="keys"):
        FeatureStats.from_dict({"count": 1, "mean": [0.0]})
