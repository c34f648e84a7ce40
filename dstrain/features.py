"""DeepSpeech features, computed exactly as TensorFlow's ``AudioSpectrogram`` + ``Mfcc`` kernels do.

The pipeline is split where training-time augmentation wants it:

    samples --spectrogram--> |X|^2 (257 bins) --mel--> log filterbank (40) --dct--> MFCC (26)

The feature store keeps the log mel filterbank; the DCT (a 40x26 matrix product) runs in the input
pipeline (:func:`dct_matrix`). Constants and algorithms follow tensorflow/core/kernels/spectrogram.cc,
mfcc_mel_filterbank.cc and mfcc_dct.cc, in float64 as those kernels compute.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from dstrain.config import option

_FILTERBANK_FLOOR = 1e-12  # Mfcc::Compute's kFilterbankFloor, before the log


@dataclass(frozen=True)
class FeatureConfig:
    """Features: what preprocessing computes; recorded in the store's manifest and in exports, read back from there"""

    sample_rate: int = option(16000, names=("--audio_sample_rate",))
    """Sample rate in Hz the audio is resampled to before features are computed (DeepSpeech's --audio_sample_rate;
    8000 for telephony corpora). Models trained on the store expect it, and dstrain transcribe resamples to it."""
    window_ms: float = option(32.0, names=("--feature_win_len",))
    """Spectrogram window length in milliseconds (DeepSpeech's --feature_win_len); a whole number of samples."""
    step_ms: float = option(20.0, names=("--feature_win_step",))
    """Spectrogram window step in milliseconds (DeepSpeech's --feature_win_step), the model's frame period."""
    n_mel: int = option(40, cli=False)
    """Mel filterbank channels (TensorFlow Mfcc's filterbank_channel_count)."""
    lower_hz: float = option(20.0, cli=False)
    """Lowest filterbank frequency in Hz."""
    upper_hz: float = option(0.0, cli=False)
    """Highest filterbank frequency in Hz; 0 means sample_rate / 2 (as DeepSpeech: 8000 at 16 kHz)."""
    n_mfcc: int = option(26, cli=False)
    """MFCC coefficients fed to the model (DeepSpeech's n_input)."""

    def __post_init__(self) -> None:
        if self.sample_rate < 1:
            raise ValueError(f"--audio_sample_rate must be a positive number of Hz, got {self.sample_rate}")
        if not self.upper_hz:
            object.__setattr__(self, "upper_hz", self.sample_rate / 2)  # recorded resolved: manifests compare equal
        for name, flag in (("window_ms", "--feature_win_len"), ("step_ms", "--feature_win_step")):
            value = getattr(self, name)
            samples = value * self.sample_rate / 1000
            if value <= 0 or abs(samples - round(samples)) > 1e-6:
                raise ValueError(
                    f"{flag} ({name}) {value} ms is not a positive whole number of samples at "
                    f"--audio_sample_rate {self.sample_rate} ({samples:g}); adjust it or resample the audio"
                )
        if not 0 <= self.lower_hz < self.upper_hz <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= lower_hz < upper_hz <= sample_rate/2, got {self.lower_hz}, {self.upper_hz}")
        if not 0 < self.n_mfcc <= self.n_mel:
            raise ValueError(f"n_mfcc={self.n_mfcc} must be in 1..n_mel={self.n_mel}")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_ms * self.sample_rate / 1000))

    @property
    def step_samples(self) -> int:
        return int(round(self.step_ms * self.sample_rate / 1000))

    @property
    def fft_length(self) -> int:
        return 1 << (self.window_samples - 1).bit_length()

    @property
    def n_bins(self) -> int:
        return self.fft_length // 2 + 1

    def n_frames(self, n_samples: int) -> int:
        if n_samples < self.window_samples:
            return 0
        return 1 + (n_samples - self.window_samples) // self.step_samples

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpectedFeatures:
    """Feature parameters (DeepSpeech's flags: preprocess sets them, stores record them, training checks them)"""

    audio_sample_rate: int | None = None
    """Sample rate in Hz the training stores must have been preprocessed at (dstrain preprocess --audio_sample_rate);
    unset: the stores' own, whatever it is. The model, its checkpoints and exports take the stores' rate."""
    feature_win_len: float | None = None
    """Feature window length in milliseconds the training stores must have (dstrain preprocess --feature_win_len);
    unset: the stores' own."""
    feature_win_step: float | None = None
    """Feature window step in milliseconds the training stores must have (dstrain preprocess --feature_win_step);
    unset: the stores' own."""

    def check(self, features: FeatureConfig, where: str) -> None:
        """A store preprocessed otherwise than these flags say is an error naming the flag and the fix."""
        for flag, name in (
            ("audio_sample_rate", "sample_rate"),
            ("feature_win_len", "window_ms"),
            ("feature_win_step", "step_ms"),
        ):
            want, have = getattr(self, flag), getattr(features, name)
            if want is not None and want != have:
                raise ValueError(
                    f"--{flag} {want:g}: {where} was preprocessed with --{flag} {have:g}; preprocess it "
                    f"again with dstrain preprocess --{flag} {want:g}, or leave --{flag} out"
                )


# Frames per FFT block: keeps each temporary under glibc's 128 KiB mmap threshold (31 x 512 x 8 bytes), so
# blocks are recycled from the heap. Whole-utterance temporaries were mmapped and page-faulted on every call,
# which made the function twice as slow.
_BLOCK_FRAMES = 31


def power_spectrogram(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """``|FFT|^2`` of periodic-Hann windowed frames: float32 ``[frames, n_bins]`` (AudioSpectrogram).

    Computed in float64 like the kernel, then rounded to float32 as it hands the result to the Mfcc op.
    """
    samples = np.asarray(samples).reshape(-1)
    n = cfg.n_frames(samples.shape[0])
    out = np.empty((n, cfg.n_bins), dtype=np.float32)
    if n == 0:
        return out
    frames = np.lib.stride_tricks.sliding_window_view(samples, cfg.window_samples)[:: cfg.step_samples][:n]
    hann = _hann(cfg.window_samples)  # float64: the product is float64 whatever the samples' type
    for i in range(0, n, _BLOCK_FRAMES):
        spectrum = np.fft.rfft(frames[i : i + _BLOCK_FRAMES] * hann, n=cfg.fft_length, axis=1)
        power = np.square(spectrum.real)
        power += np.square(spectrum.imag)
        out[i : i + _BLOCK_FRAMES] = power
    return out


def log_mel(power: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log mel filterbank, float32 ``[frames, n_mel]``; TensorFlow's Mfcc before its DCT.

    TensorFlow's filterbank weighs the *magnitude* (sqrt of the power) spectrum. It sums in float64; float32
    here changes results by < 1e-6 (each channel sums a few dozen positive terms) at half the cost.
    """
    energies = np.sqrt(power.astype(np.float32, copy=False)) @ mel_matrix(cfg)
    np.maximum(energies, _FILTERBANK_FLOOR, out=energies)
    return np.log(energies)


def mfcc_from_log_mel(logmel: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    return (logmel.astype(np.float64) @ dct_matrix(cfg)).astype(np.float32)


def mfcc(samples: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """DeepSpeech's input features, float32 ``[frames, n_mfcc]``."""
    return mfcc_from_log_mel(log_mel(power_spectrogram(samples, cfg), cfg), cfg)


@functools.lru_cache(maxsize=8)
def _hann(length: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)


def _freq_to_mel(freq: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def _mel_matrix(cfg: FeatureConfig) -> np.ndarray:
    """``[n_bins, n_mel]`` weights reproducing MfccMelFilterbank's band mapper and tapers."""
    n_bins, n_mel = cfg.n_bins, cfg.n_mel
    mel_low, mel_high = _freq_to_mel(cfg.lower_hz), _freq_to_mel(cfg.upper_hz)
    spacing = (mel_high - mel_low) / (n_mel + 1)
    centers = mel_low + spacing * np.arange(1, n_mel + 2)  # one extra: the top edge of the last triangle
    hz_per_bin = 0.5 * cfg.sample_rate / (n_bins - 1)
    start = int(1.5 + cfg.lower_hz / hz_per_bin)  # DC is always excluded, as HTK does
    end = int(cfg.upper_hz / hz_per_bin)

    weights = np.zeros((n_bins, n_mel), dtype=np.float64)
    channel = 0
    for i in range(start, end + 1):
        melf = float(_freq_to_mel(i * hz_per_bin))
        while channel < n_mel and centers[channel] < melf:
            channel += 1
        band = channel - 1  # the channel whose right (falling) side holds bin i; may be -1
        if band >= 0:
            w = (centers[band + 1] - melf) / (centers[band + 1] - centers[band])
            weights[i, band] += w
        else:
            w = (centers[0] - melf) / (centers[0] - mel_low)
        if band + 1 < n_mel:
            weights[i, band + 1] += 1.0 - w
    return weights


@functools.lru_cache(maxsize=8)
def mel_matrix(cfg: FeatureConfig) -> np.ndarray:
    """``[n_bins, n_mel]`` float32 filterbank weights on the magnitude spectrum (what :func:`log_mel` applies;
    exports put the same constant in their graph)."""
    return _mel_matrix(cfg).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _dct(n_in: int, n_out: int) -> np.ndarray:
    i = np.arange(n_out)[:, None]
    j = np.arange(n_in)[None, :]
    cosines = np.sqrt(2.0 / n_in) * np.cos(i * (np.pi / n_in) * (j + 0.5))
    return cosines.T.copy()  # [n_in, n_out]


def dct_matrix(cfg: FeatureConfig) -> np.ndarray:
    """``[n_mel, n_mfcc]`` DCT-II matrix of TensorFlow's MfccDct (no 0th-coefficient scaling)."""
    return _dct(cfg.n_mel, cfg.n_mfcc)
