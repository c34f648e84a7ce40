import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, SHARED

from dstrain.audio import read_audio, to_mono_rate
from dstrain.features import FeatureConfig, dct_matrix, log_mel, mfcc, power_spectrogram


def tf_reference(samples: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    spec = tf.raw_ops.AudioSpectrogram(
        input=tf.constant(samples[:, None]),
        window_size=cfg.window_samples,
        stride=cfg.step_samples,
        magnitude_squared=True,
    )
    out = tf.raw_ops.Mfcc(
        spectrogram=spec,
        sample_rate=cfg.sample_rate,
        upper_frequency_limit=cfg.upper_hz,
        lower_frequency_limit=cfg.lower_hz,
        filterbank_channel_count=cfg.n_mel,
        dct_coefficient_count=cfg.n_mfcc,
    )
    return spec.numpy()[0], out.numpy()[0]


@pytest.fixture(scope="module")
def ldc93s1() -> np.ndarray:
    return read_audio(str(DATA / "LDC93S1.wav"))


def test_mfcc_matches_tensorflow_ops(ldc93s1):
    cfg = FeatureConfig()
    spec, ref = tf_reference(ldc93s1, cfg)
    ours = mfcc(ldc93s1, cfg)
    assert ours.shape == ref.shape == (145, 26)
    assert np.abs(ours - ref).max() <= 1e-3
    np.testing.assert_allclose(power_spectrogram(ldc93s1, cfg), spec, rtol=1e-5, atol=1e-6)


def test_stored_log_mel_then_dct_in_graph_matches(ldc93s1):
    # The training path: log mel from the store, DCT as a TF matmul in the input pipeline.
    cfg = FeatureConfig()
    _, ref = tf_reference(ldc93s1, cfg)
    stored = log_mel(power_spectrogram(ldc93s1, cfg), cfg)
    in_graph = (tf.constant(stored) @ tf.constant(dct_matrix(cfg), tf.float32)).numpy()
    assert np.abs(in_graph - ref).max() <= 1e-3


def test_other_parameters_match_too():
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    cfg = FeatureConfig(sample_rate=8000, window_ms=32, step_ms=10, n_mel=20, lower_hz=50, upper_hz=4000, n_mfcc=13)
    _, ref = tf_reference(samples, cfg)
    assert np.abs(mfcc(samples, cfg) - ref).max() <= 1e-3


def test_too_short_audio_gives_no_frames():
    cfg = FeatureConfig()
    assert mfcc(np.zeros(511, np.float32), cfg).shape == (0, 26)
    assert mfcc(np.zeros(512, np.float32), cfg).shape == (1, 26)
    assert cfg.n_frames(512 + 320) == 2


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="window_ms"):
        FeatureConfig(window_ms=32.01)
    with pytest.raises(ValueError, match="n_mfcc"):
        FeatureConfig(n_mfcc=41)


def test_8khz_recording_resamples_close_to_16khz_original(ldc93s1):
    path = SHARED / "data" / "smoke" / "LDC93S1_pcms16le_1_8000.wav"
    if not path.exists():
        pytest.skip("../shared/data/smoke not present")
    up = read_audio(str(path))
    assert abs(len(up) - len(ldc93s1)) <= 2
    cfg = FeatureConfig()
    n = min(len(up), len(ldc93s1))
    a = log_mel(power_spectrogram(ldc93s1[:n], cfg), cfg)
    b = log_mel(power_spectrogram(up[:n], cfg), cfg)
    # The 8 kHz copy has nothing above 4 kHz; the 28 mel channels whose band ends below 3.5 kHz must agree.
    mel = 1127 * np.log1p(np.array([cfg.lower_hz, cfg.upper_hz]) / 700)
    tops = 700 * np.expm1((mel[0] + (mel[1] - mel[0]) / (cfg.n_mel + 1) * np.arange(2, cfg.n_mel + 2)) / 1127)
    low = int(np.sum(tops < 3500))
    assert low == 28
    assert np.abs(a[:, :low] - b[:, :low]).mean() < 0.05
    assert np.corrcoef(a[:, :low].ravel(), b[:, :low].ravel())[0, 1] > 0.999


def test_stereo_is_averaged_and_resampled():
    t = np.arange(44100) / 44100
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, left], axis=1).astype(np.float32)
    mono = to_mono_rate(stereo, 44100, 16000)
    assert abs(len(mono) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(mono[1000:-1000] * np.hanning(len(mono) - 2000)))
    peak_hz = np.argmax(spectrum) * 16000 / (len(mono) - 2000)
    assert abs(peak_hz - 1000) < 2
    rms_db = 20 * np.log10(np.sqrt(np.mean(mono[1000:-1000] ** 2)) / (0.5 / np.sqrt(2)))
    assert abs(rms_db) < 0.5
