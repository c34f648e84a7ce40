import math

import numpy as np
import pytest
from augment_reference import Augmenter

from dstrain.augment.filterbank import DEFAULT_AUGMENT, parse_augmentations
from dstrain.augment.loader import sample_rng
from dstrain.augment.spec import parse_range
from dstrain.features import FeatureConfig, log_mel

CFG = FeatureConfig()
N_MEL = CFG.n_mel
# What features.py stores for a silent (all-zero power) frame: the value "zero in the spectrogram" maps to.
SILENCE = float(log_mel(np.zeros((1, CFG.n_bins), np.float32), CFG)[0, 0])
DB = math.log(10.0) / 20.0  # log mel change per dB of signal gain (log mel is the log of a magnitude)


def speech(n_frames: int = 400, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Log mel-like values well above the floor."""
    rng = np.random.default_rng(seed)
    return (rng.normal(-2.0, 1.5, (n_frames, N_MEL))).astype(dtype)


def run(spec, x=None, seed=0, clock=0.0, noise_source=None, **kw):
    x = speech() if x is None else x
    specs = [spec] if isinstance(spec, str) else spec
    return Augmenter.from_specs(specs, noise_source=noise_source, **kw).apply(x, sample_rng(seed, 0, 0), clock)


# ---------------------------------------------------------------------------------------------------- parsing


def test_parse_defaults_and_types_match_deepspeech():
    fm, tm, dr, add, mul, pitch, tempo, warp = parse_augmentations(
        ["frequency_mask", "time_mask", "dropout", "add", "multiply", "pitch", "tempo", "warp"]
    )
    assert fm.p == 1.0 and (fm.n.start, fm.size.start) == (3, 2) and fm.n.integer and fm.size.integer
    assert tm.n.start == 3 and tm.size.start == 10.0 and not tm.size.integer and tm.domain == "spectrogram"
    assert dr.rate.start == 0.05 and dr.domain == "spectrogram"
    assert add.stddev.start == 5.0 and add.domain == "features" and mul.domain == "features"
    assert (pitch.pitch.start, pitch.pitch.end, pitch.pitch.r) == (1.075, 1.075, 0.125)
    assert tempo.factor.start == 1.1 and tempo.max_time == -1.0
    assert (warp.nt.start, warp.nf.start, warp.wt.start, warp.wf.start) == (1, 1, 0.1, 0.0)
    assert warp.nt.integer and not warp.wt.integer


def test_parse_value_forms():
    (fm,) = parse_augmentations(["frequency_mask[p=0.25, n=1:3~1, size = 7]"])
    assert fm.p == 0.25
    assert (fm.n.start, fm.n.end, fm.n.r) == (1, 3, 1) and isinstance(fm.n.start, int)
    assert parse_range("-10:-40", integer=False) == parse_range("-10.0:-40.0", integer=False)
    r = parse_range("1.2~0.4", integer=False)
    assert (r.start, r.end, r.r) == (1.2, 1.2, 0.4)
    (w,) = parse_augmentations(["warp[num_t=4,num_f=2,warp_t=0.5:1.0,warp_f=0.2]"])
    assert (w.nt.start, w.nf.start, w.wt.start, w.wt.end, w.wf.start) == (4, 2, 0.5, 1.0, 0.2)
    (ov,) = parse_augmentations(
        ["overlay[source=gs://bucket/noise,snr=50:20~10,layers=2]"], noise_source=lambda r, n: 0
    )
    assert ov.source == "gs://bucket/noise" and (ov.snr.start, ov.snr.end, ov.snr.r) == (50.0, 20.0, 10.0)
    assert parse_augmentations(None) == [] and parse_augmentations([]) == []


@pytest.mark.parametrize(
    "spec, words",
    [
        ("blur[p=1]", ["blur", "unknown augmentation"]),
        ("time_mask[q=1]", ["'q'", "unknown parameter"]),
        ("time_mask[size=abc]", ["size", "'abc'", "not a number"]),
        ("frequency_mask[n=1.5]", ["n", "'1.5'", "integer"]),
        ("frequency_mask[n=1:2:3]", ["n", "':'"]),
        ("add[stddev=1~2~3]", ["stddev", "'~'"]),
        ("add[stddev=1~-2]", ["stddev", "negative"]),
        ("dropout[p=x]", ["p=", "not a number"]),
        ("dropout[p=1.5]", ["p=1.5", "probability"]),
        ("dropout[rate]", ["'rate'", "key=value"]),
        ("add[domain=waveform]", ["domain", "waveform"]),
        ("tempo[factor=0.5~1]", ["factor", "> 0"]),
        ("pitch[pitch=0]", ["pitch", "> 0"]),
        ("Time_Mask", ["expected NAME"]),
        ("volume[dbfs=-20]", ["dbfs", "gain"]),
        ("warp[nt=1,num_t=2]", ["'nt'", "twice"]),
        ("frequency_mask[domain=features]", ["'domain'", "unknown parameter"]),
    ],
)
def test_parse_errors_name_spec_and_part(spec, words):
    with pytest.raises(ValueError) as err:
        parse_augmentations(["time_mask", spec])
    message = str(err.value)
    assert repr(spec) in message
    for word in words:
        assert word in message


def test_signal_domain_is_a_clear_error():
    with pytest.raises(ValueError, match=r"filterbank.*domain=spectrogram.*domain=features"):
        parse_augmentations(["time_mask[domain=signal]"])


def test_overlay_needs_noise_source():
    with pytest.raises(ValueError, match="noise_source"):
        parse_augmentations(["overlay[snr=10]"])
    with pytest.raises(ValueError, match="b.sdb"):
        parse_augmentations(["overlay[source=b.sdb]"], noise_source={"a.sdb": lambda r, n: 0})


# ---------------------------------------------------------------------------------------------------- ranges


def test_range_follows_clock():
    r = parse_range("2:6", integer=False)
    rng = np.random.default_rng(0)
    assert [r.pick(rng, c) for c in (0.0, 0.25, 1.0, -1.0, 3.0)] == [2.0, 3.0, 6.0, 2.0, 6.0]
    assert parse_range("1:4", integer=True).pick(rng, 0.5) in (2, 3)  # 2.5, rounded
    # through the augmenter: time_mask size 20:200 ms at 20 ms frames masks 1 frame at clock 0, 10 at 1
    for clock, frames in ((0.0, 1), (0.5, 5), (1.0, 10)):
        y = run("time_mask[n=1,size=20:200]", clock=clock)
        assert np.all(y == SILENCE, axis=1).sum() == frames


def test_range_radius_stays_inside_and_spreads():
    r = parse_range("1.2~0.4", integer=False)
    rng = np.random.default_rng(1)
    v = np.array([r.pick(rng, 0.0) for _ in range(2000)])
    assert v.min() >= 0.8 and v.max() <= 1.6
    assert v.min() < 0.85 and v.max() > 1.55 and abs(v.mean() - 1.2) < 0.02
    both = parse_range("4:6~2", integer=True)
    at_start = {both.pick(rng, 0.0) for _ in range(500)}
    at_end = {both.pick(rng, 1.0) for _ in range(500)}
    assert at_start == {2, 3, 4, 5, 6} and at_end == {4, 5, 6, 7, 8}
    # and through an op: add[stddev=0.5~0.25] gives per-sample std within [0.25, 0.75], varying
    stds = [float(np.std(run("add[stddev=0.5~0.25]", seed=s) - speech())) for s in range(40)]
    assert 0.24 < min(stds) < 0.35 and 0.65 < max(stds) < 0.76


# ---------------------------------------------------------------------------------------------------- masks


def test_frequency_mask_masks_exactly_size_channels_with_silence():
    x = speech()
    for seed in range(20):
        y = run("frequency_mask[n=1,size=5]", x=x, seed=seed)
        masked = np.all(y == SILENCE, axis=0)
        idx = np.flatnonzero(masked)
        assert len(idx) == 5 and idx[-1] - idx[0] == 4  # one contiguous band
        np.testing.assert_array_equal(y[:, ~masked], x[:, ~masked])
    assert SILENCE == pytest.approx(math.log(1e-12), abs=1e-5)


def test_frequency_mask_fill_mean():
    x = speech()
    y = run("frequency_mask[n=1,size=3,fill=mean]", x=x)
    changed = np.flatnonzero(np.any(y != x, axis=0))
    assert len(changed) == 3
    np.testing.assert_allclose(y[:, changed], np.broadcast_to(x[:, changed].mean(axis=0), (len(x), 3)), rtol=1e-6)


def test_time_mask_size_in_ms_and_domains():
    x = speech()
    y = run("time_mask[n=1,size=100]", x=x)  # 100 ms at 20 ms frames
    rows = np.all(y == SILENCE, axis=1)
    assert rows.sum() == 5 and np.ptp(np.flatnonzero(rows)) == 4
    np.testing.assert_array_equal(y[~rows], x[~rows])
    assert np.all(run("time_mask[n=1,size=100]", x=x, step_ms=10.0) == SILENCE, axis=1).sum() == 10
    y = run("time_mask[n=1,size=100,domain=features]", x=x)
    assert np.all(y == 0.0, axis=1).sum() == 5
    y = run("time_mask[n=1,size=100,fill=mean]", x=x)
    rows = np.flatnonzero(np.any(y != x, axis=1))
    assert len(rows) == 5
    np.testing.assert_allclose(y[rows], np.broadcast_to(x.mean(axis=0), (5, N_MEL)), rtol=1e-6)


def test_masks_keep_at_least_one_frame_and_channel():
    x = speech(3)
    y = run("time_mask[n=1,size=10000]", x=x)
    assert np.all(y == SILENCE, axis=1).sum() == 2
    y = run("frequency_mask[n=1,size=1000]", x=x)
    assert np.all(y == SILENCE, axis=0).sum() == N_MEL - 1
    y = run("time_mask[n=1,size=100]", x=speech(1))
    assert y.shape == (1, N_MEL)


def test_dropout_rate_in_each_domain():
    x = speech(1000)
    y = run("dropout[rate=0.3]", x=x)
    dropped = y == SILENCE
    assert abs(dropped.mean() - 0.3) < 0.01
    np.testing.assert_allclose(y[~dropped], x[~dropped], rtol=1e-5, atol=1e-5)
    y = run("dropout[rate=0.1,domain=features]", x=x)
    assert abs((y == 0).mean() - 0.1) < 0.01
    np.testing.assert_array_equal(y[y != 0], x[y != 0])
    assert np.array_equal(run("dropout[rate=0]", x=x), x)


# ---------------------------------------------------------------------------------------------------- noise ops


def test_add_std_in_features_and_spectrogram():
    x = speech(1000)
    d = run("add[stddev=0.5]", x=x) - x
    assert abs(d.std() - 0.5) < 0.01 and abs(d.mean()) < 0.01
    loud = np.full((1000, N_MEL), 3.0, np.float32)  # mel power e**6 ~ 403: stddev 2 never goes negative
    y = run("add[stddev=2,domain=spectrogram]", x=loud)
    dp = np.exp(2.0 * y.astype(np.float64)) - np.exp(6.0)
    assert abs(dp.std() - 2.0) < 0.05 and abs(dp.mean()) < 0.05


def test_add_in_spectrogram_never_goes_below_silence():
    y = run("add[stddev=100,domain=spectrogram]")
    assert np.isfinite(y).all() and y.min() == pytest.approx(SILENCE, abs=1e-5)


def test_multiply_keeps_mean():
    x = np.full((1000, N_MEL), 2.0, np.float32)
    y = run("multiply[stddev=0.2]", x=x)
    ratio = y / x
    assert abs(ratio.mean() - 1.0) < 0.01 and abs(ratio.std() - 0.2) < 0.01
    y = run("multiply[stddev=0.2,domain=spectrogram]", x=x)
    ratio = np.exp(2.0 * (y.astype(np.float64) - 2.0))
    assert abs(ratio.mean() - 1.0) < 0.01 and abs(ratio.std() - 0.2) < 0.01


def test_volume_is_a_gain_on_mel_power():
    x = speech()
    x[:5] = SILENCE
    y = run("volume[gain=6]", x=x)
    np.testing.assert_allclose(y[5:] - x[5:], 6 * DB, atol=1e-5)  # E *= 10**(6/20): power *= 10**(6/10)
    assert np.all(y[:5] == x[:5])  # silence stays silence
    y = run("volume[gain=-600]", x=x)
    assert np.all(y == pytest.approx(SILENCE, abs=1e-5))
    y = run("volume[gain=0~6]", x=x)
    assert 0 < abs(y[10, 0] - x[10, 0]) <= 6 * DB + 1e-5


def test_overlay_mixes_in_power_at_snr():
    x = speech(200)
    noise = speech(300, seed=7) + 1.0
    source = lambda rng, n: noise  # noqa: E731
    high = run("overlay[snr=60]", x=x, noise_source=source)
    low = run("overlay[snr=-30]", x=x, noise_source=source)
    assert np.abs(high - x).mean() < 1e-3
    assert np.abs(low - x).mean() > 1.0
    # exact power-domain mix: P = S + g N with mean(g N) = mean(S) / 10**(snr/10), then levelled to mean(S)
    y = run("overlay[snr=5]", x=x, noise_source=lambda rng, n: noise[:n])
    s, nz = np.exp(2.0 * x.astype(np.float64)), np.exp(2.0 * noise[:200].astype(np.float64))
    mix = s + nz * s.mean() / (nz.mean() * 10**0.5)
    mix *= s.mean() / mix.mean()
    np.testing.assert_allclose(y, 0.5 * np.log(mix), atol=1e-4)


def test_overlay_layers_add_power_and_short_noise_is_tiled():
    x = speech(100)
    calls = []

    def source(rng, n):
        calls.append(n)
        return np.full((7, N_MEL), float(len(calls)), np.float32)  # layer k has log mel k

    y = run("overlay[snr=0,layers=2]", x=x, noise_source=source)
    assert calls == [100, 100] and y.shape == x.shape
    s = np.exp(2.0 * x.astype(np.float64))
    nz = np.exp(2.0) + np.exp(4.0)  # powers add
    mix = s + nz * s.mean() / nz
    mix *= s.mean() / mix.mean()
    np.testing.assert_allclose(y, 0.5 * np.log(mix), atol=1e-4)
    with pytest.raises(ValueError, match="noise_source returned shape"):
        run("overlay", x=x, noise_source=lambda rng, n: np.zeros((n, 13), np.float32))


def test_overlay_mapping_by_source():
    x = speech(50)
    quiet = {"q": lambda rng, n: np.full((n, N_MEL), -5.0, np.float32)}
    assert run("overlay[source=q,snr=80]", x=x, noise_source=quiet).shape == x.shape


# ---------------------------------------------------------------------------------------------------- geometry


def test_tempo_changes_frame_count():
    x = speech(400)
    assert run("tempo[factor=2]", x=x).shape == (200, N_MEL)
    assert run("tempo[factor=0.5]", x=x).shape == (800, N_MEL)
    assert run("tempo[factor=1.1]", x=x).shape == (363, N_MEL)  # int(400 / 1.1), as DeepSpeech
    assert run("tempo[factor=0.5,max_time=1000]", x=x).shape == (50, N_MEL)  # 1 s of 20 ms frames
    const = np.full((400, N_MEL), -1.5, np.float32)
    np.testing.assert_allclose(run("tempo[factor=1.7]", x=const), -1.5, atol=1e-5)


def test_tempo_never_returns_zero_frames_and_honours_min_frames():
    aug = Augmenter.from_specs(["tempo[factor=100]"])
    assert aug.apply(speech(3), sample_rng(0, 0, 0), 0.0).shape == (1, N_MEL)
    assert aug.apply(speech(300), sample_rng(0, 0, 0), 0.0, min_frames=40).shape == (40, N_MEL)


def test_pitch_keeps_shape_and_moves_energy_in_frequency():
    x = speech()
    np.testing.assert_allclose(run("pitch[pitch=1]", x=x), x, atol=1e-5)
    assert run("pitch[pitch=1.3~0.2]", x=x).shape == x.shape
    # a peak at channel 12 moves to the channel centred nearest 1.5x its frequency
    peak = np.full((10, N_MEL), -6.0, np.float32)
    peak[:, 12] = 2.0
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)  # noqa: E731
    lo, hi = mel(CFG.lower_hz), mel(CFG.upper_hz)
    centres_mel = lo + (hi - lo) / (N_MEL + 1) * np.arange(1, N_MEL + 1)
    centres_hz = 700.0 * np.expm1(centres_mel / 1127.0)
    expected = int(np.argmin(np.abs(centres_hz - 1.5 * centres_hz[12])))
    assert expected > 15
    assert np.argmax(run("pitch[pitch=1.5]", x=peak)[0]) == expected
    # lowering pitch brings silence in from above the top filter, as DeepSpeech pads with zeros
    y = run("pitch[pitch=0.5]", x=x)
    assert np.all(y[:, -5:] == pytest.approx(SILENCE, abs=1e-4)) and not np.any(y[:, :20] == SILENCE)


def test_warp_keeps_shape_and_edges():
    x = speech(200)
    y = run("warp[nt=4,nf=3,wt=0.5,wf=0.5]", x=x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y[[0, -1]], x[[0, -1]], atol=1e-4)  # zero flow at all edges
    np.testing.assert_allclose(y[:, [0, -1]], x[:, [0, -1]], atol=1e-4)
    assert np.abs(y[50:150, 10:30] - x[50:150, 10:30]).mean() > 0.1
    np.testing.assert_allclose(run("warp[nt=4,nf=3,wt=0,wf=0]", x=x), x)
    np.testing.assert_allclose(run("warp[nt=0,nf=3,wt=1,wf=1]", x=x), x)


# ---------------------------------------------------------------------------------------------------- application


def test_probability():
    x = speech(50)
    aug0 = Augmenter.from_specs(["add[p=0,stddev=1]"])
    aug1 = Augmenter.from_specs(["add[p=1,stddev=1]"])
    half = Augmenter.from_specs(["add[p=0.5,stddev=1]"])
    applied = 0
    for i in range(400):
        assert np.array_equal(aug0.apply(x, sample_rng(3, 0, i), 0.0), x)
        assert not np.array_equal(aug1.apply(x, sample_rng(3, 0, i), 0.0), x)
        applied += not np.array_equal(half.apply(x, sample_rng(3, 0, i), 0.0), x)
    assert 160 < applied < 240


def test_determinism():
    x = speech()
    aug = Augmenter.from_specs(list(DEFAULT_AUGMENT) + ["dropout[rate=0.1]", "add[stddev=0.1]", "pitch", "volume"])
    a = aug.apply(x, sample_rng(42, 3, 17), 0.3)
    b = aug.apply(x, sample_rng(42, 3, 17), 0.3)
    assert np.array_equal(a, b)
    for other in (sample_rng(43, 3, 17), sample_rng(42, 4, 17), sample_rng(42, 3, 18)):
        c = aug.apply(x, other, 0.3)
        assert c.shape != a.shape or not np.array_equal(a, c)
    assert np.array_equal(sample_rng(1, 2, 3).random(4), sample_rng(1, 2, 3).random(4))
    sample_rng(-1, 0, 2**70).random()  # any ints are accepted


def test_dtype_preserved_and_input_untouched():
    x16 = speech(dtype=np.float16)
    before = x16.copy()
    aug = Augmenter.from_specs(["frequency_mask", "time_mask", "tempo[factor=1.3]", "add[stddev=0.1]"])
    y = aug.apply(x16, sample_rng(0, 0, 0), 0.0)
    assert y.dtype == np.float16 and y.shape[1] == N_MEL and np.isfinite(y).all()
    assert np.array_equal(x16, before)
    assert aug.apply(speech(dtype=np.float64), sample_rng(0, 0, 0), 0.0).dtype == np.float64
    y = Augmenter([]).apply(x16, sample_rng(0, 0, 0), 0.0)
    assert y is not x16 and np.array_equal(y, x16)
    # volume recognises float16's rounded floor as silence
    z = x16.copy()
    z[0] = SILENCE
    assert np.all(Augmenter.from_specs(["volume[gain=10]"]).apply(z, sample_rng(0, 0, 0), 0.0)[0] == z[0])


def test_domain_order_as_deepspeech():
    # features-domain ops run after spectrogram-domain ones whatever the command-line order
    x = speech()
    y = run(["time_mask[n=40,size=100,domain=features]", "frequency_mask[n=1,size=5]"], x=x)
    freq = np.all((y == SILENCE) | (y == 0), axis=0)
    rows = np.all((y == 0) | (y == SILENCE), axis=1)
    assert freq.sum() == 5 and rows.any()
    assert np.all(y[np.ix_(rows, freq)] == 0)  # the later (features) mask wins on the overlap


def test_default_set():
    assert DEFAULT_AUGMENT and all(isinstance(s, str) for s in DEFAULT_AUGMENT)
    names = {a.name for a in parse_augmentations(DEFAULT_AUGMENT)}
    assert {"frequency_mask", "time_mask"} <= names
    aug = Augmenter.from_specs(DEFAULT_AUGMENT)
    x = speech(300)
    changed = 0
    for i in range(50):
        y = aug.apply(x, sample_rng(0, 0, i), i / 50)
        assert y.shape[1] == N_MEL and 250 <= y.shape[0] <= 350 and np.isfinite(y).all()
        changed += y.shape != x.shape or not np.array_equal(y, x)
    assert changed > 40


def test_rejects_bad_input():
    aug = Augmenter.from_specs(["time_mask"])
    with pytest.raises(ValueError, match="frames"):
        aug.apply(np.zeros((0, N_MEL), np.float32), sample_rng(0, 0, 0), 0.0)
    with pytest.raises(ValueError, match="float"):
        aug.apply(np.zeros((5, N_MEL), np.int16), sample_rng(0, 0, 0), 0.0)


# ---------------------------------------------------------------------------------------------------- the registry

# Every --augment op: where it runs and its parameters as "kind default". A new op, parameter or place is declared
# once, on its class in dstrain/augment/, and then here.
REGISTRY = {
    "train": {
        "add": (("device",), {"stddev": "float 5", "domain": "domain features"}),
        "dropout": (("device",), {"rate": "float 0.05", "domain": "domain spectrogram"}),
        "frequency_mask": (("device",), {"n": "int 3", "size": "int 2", "fill": "fill zero"}),
        "multiply": (("device",), {"stddev": "float 5", "domain": "domain features"}),
        "overlay": (("loader",), {"source": "str None", "snr": "float 3.0", "layers": "int 1"}),
        "pitch": (("device",), {"pitch": "float 1.075~0.125"}),
        "tempo": (("device",), {"factor": "float 1.1", "max_time": "number -1.0"}),
        "time_mask": (
            ("device",),
            {"n": "int 3", "size": "float 10.0", "domain": "domain spectrogram", "fill": "fill zero"},
        ),
        "volume": (("device", "loader"), {"gain": "float 0~6"}),
        "warp": (("device",), {"nt": "int 1", "nf": "int 1", "wt": "float 0.1", "wf": "float 0.0"}),
    },
    "preprocess": {
        "codec": (("preprocessing",), {"bitrate": "int 3200", "format": "format opus"}),
        "overlay": (("preprocessing",), {"source": "str None", "snr": "float 3.0", "layers": "int 1"}),
        "resample": (("preprocessing",), {"rate": "int 8000"}),
        "reverb": (("preprocessing",), {"delay": "float 20.0", "decay": "float 10.0"}),
        "speed": (("preprocessing",), {"factor": "float 1~0.1"}),
        "volume": (("preprocessing",), {"dbfs": "float 3.0103"}),
    },
}


def test_the_registry_lists_every_op_where_it_runs_and_its_parameters():
    from dstrain.augment import registry

    got = {
        command: {
            name: (cls.RUNS, {key: f"{kind} {default}" for key, (kind, default) in cls.PARAMS.items()})
            for name, cls in ops.items()
        }
        for command, ops in registry().items()
    }
    assert got == REGISTRY


def test_the_loader_implements_exactly_the_ops_declared_to_run_there():
    # The product holds a numpy implementation only for what runs on the loader; the reference has them all.
    from dstrain.augment.filterbank import OPS
    from dstrain.augment.loader import LoaderAugmenter

    assert {cls.name for cls in LoaderAugmenter.OPS} == {n for n, cls in OPS.items() if "loader" in cls.RUNS}
    assert set(Augmenter.OPS) == set(OPS.values())
    with pytest.raises(ValueError, match="time_mask.*cannot run on the loader"):
        LoaderAugmenter.from_specs(["time_mask"])


def test_draws_and_stretch_are_declared_on_the_op():
    fm, warp, tempo, slow, volume = parse_augmentations(
        ["frequency_mask[n=1:3~1]", "warp[nt=2,nf=1~1]", "tempo[factor=0.8~0.3]", "tempo[factor=1.5]", "volume"]
    )
    assert (fm.draws(), warp.draws(), tempo.draws(), volume.draws()) == (2 + 2 * 4, 5 + 4 * 2 * 2, 2, 2)
    assert tempo.stretch() == pytest.approx(2.0) and slow.stretch() == 1.0 and volume.stretch() == 1.0
