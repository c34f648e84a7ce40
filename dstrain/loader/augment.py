"""Training-time augmentation of stored log mel filterbanks, with DeepSpeech 0.9's ``--augment`` syntax.

Where it runs: training applies these ops in the training step, on the device (:mod:`dstrain.loader.device_augment`).
This module parses every spec; its numpy ops run on the loader threads for what cannot move there (``overlay`` reads
another store, :func:`split_ops`) and are the reference the device's are tested against.

Syntax (one string per ``--augment``)::

    NAME                      all parameters at their defaults
    NAME[p=0.5,key=value,...] p = probability that the op is applied to a given sample (default 1.0)

A value is ``<v>`` (constant), ``<start>:<end>`` (moves linearly with the training clock 0..1),
``<v>~<r>`` (uniform in [v-r, v+r] per sample) or ``<start>:<end>~<r>`` (both). Integer parameters take
integer literals and yield rounded values, as in DeepSpeech's ``int_range``.

Domains: the store holds ``log(max(E, 1e-12))`` where ``E`` is TensorFlow Mfcc's filterbank of the
*magnitude* spectrum (see :mod:`dstrain.features`). ``domain=spectrogram`` (DeepSpeech: the power
spectrogram) maps to the mel power ``E**2 = exp(2 * log_mel)``, which scales like power (a signal gain of
g dB multiplies it by 10**(g/10)); "zero" there is silence, i.e. the 1e-12 floor in log mel.
``domain=features`` (DeepSpeech: MFCCs) maps to log mel itself. ``domain=signal`` is an error: there is
no waveform. Ops run in DeepSpeech's domain order (sample ops, then spectrogram, then features), in
command-line order within a domain.

Ops (defaults as in DeepSpeech 0.9 unless stated):

* ``frequency_mask[n=3,size=2,fill=zero]``: n masks of ``size`` mel channels (DeepSpeech: FFT bins).
* ``time_mask[n=3,size=10.0,domain=spectrogram,fill=zero]``: n masks of ``size`` ms of frames.
* ``dropout[rate=0.05,domain=spectrogram]``: sets a fraction ``rate`` of values to zero in the domain.
* ``add[stddev=5,domain=features]``: adds N(0, stddev) noise to every value in the domain.
* ``multiply[stddev=5,domain=features]``: multiplies every value in the domain by N(1, stddev).
* ``pitch[pitch=1.075~0.125]``: scales frequencies by ``pitch``, resampling the mel channels.
* ``tempo[factor=1.1,max_time=-1]``: plays ``factor`` times faster: T/factor frames (at most max_time ms).
* ``warp[nt=1,nf=1,wt=0.1,wf=0.0]``: smooth random time/frequency warp from an nt x nf grid of points
  (``num_t``/``num_f``/``warp_t``/``warp_f`` are accepted as aliases).
* ``volume[gain=0~6]``: (not DeepSpeech's ``dbfs``) gain in dB, a factor 10**(gain/10) on mel power.
* ``overlay[source=...,snr=3.0,layers=1]``: ``layers`` noise utterances from the caller's
  ``noise_source`` mixed in mel power at ``snr`` dB (mean mel power ratio), then levelled back.

Waveform ops (``codec``, ``resample``, ``reverb``, ``speed``, ``volume[dbfs]``, ``overlay`` of audio files) are
refused here: :mod:`dstrain.prep.augment` applies them at preprocessing into stored, labelled copies
(``dstrain preprocess --augment ... --augment_copies K``), and the errors say so.

``fill=mean`` (an extension) masks with each channel's mean log mel over the utterance, which is what
SpecAugment's zero is after per-channel mean normalisation; DeepSpeech's ``fill=zero`` writes silence.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from dstrain.features import _FILTERBANK_FLOOR, FeatureConfig, _freq_to_mel

NoiseSource = Callable[[np.random.Generator, int], np.ndarray]
"""``(rng, n_frames) -> log mel [N, n_mel]``; any N >= 1 (tiled when short, randomly cropped when long)."""

DEFAULT_AUGMENT: tuple[str, ...] = (
    # SpecAugment (Park et al. 2019) scaled to 40 channels and 20 ms frames, masking with the mean as it
    # does; plus Ko et al.'s 0.9..1.1 speed perturbation and a mild time warp.
    "frequency_mask[p=0.8,n=2,size=4~3,fill=mean]",
    "time_mask[p=0.8,n=2,size=120~80,fill=mean]",
    "tempo[p=0.5,factor=1~0.1]",
    "warp[p=0.2,nt=4,nf=1,wt=0.1,wf=0.0]",
)
"""The recommended ``--augment`` set; augmentation stays off unless the user asks for it."""

_FLOOR_LOG = math.log(_FILTERBANK_FLOOR)


def zero_value(domain: str, power: bool) -> float:
    """The value that is 0 in ``domain`` (spectrogram or gain), in the power or the log representation (masks need no
    conversion): shared by the loader's and the device's augmenters."""
    if domain == "spectrogram":
        return 0.0 if power else _FLOOR_LOG
    return 1.0 if power else 0.0


_FLOOR_POW = _FILTERBANK_FLOOR**2
# At or below this a value is the floor (digital silence); float16 stores the floor 0.006 higher.
_SILENT_LOG = _FLOOR_LOG + 0.05
_SILENT_POW = math.exp(2 * _SILENT_LOG)

_SPEC = re.compile(r"^(?P<name>[a-z_]+)(\[(?P<params>.*)\])?$", re.DOTALL)
_STAGE_SAMPLE, _STAGE_SPECTROGRAM, _STAGE_FEATURES = 0, 1, 2
_SEED_DOMAIN = 0x61756761  # keeps these streams apart from any other use of the same (seed, epoch, key)


def sample_rng(seed: int, epoch: int, sample_key: int) -> np.random.Generator:
    """A Generator determined by ``(seed, epoch, sample_key)`` alone, so any thread gets the same draws."""
    entropy = [int(v) % (1 << 64) for v in (seed, epoch, sample_key)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(_SEED_DOMAIN,))))


# ----------------------------------------------------------------------------------------------------------
# Value ranges


@dataclass(frozen=True)
class ValueRange:
    """DeepSpeech's ``ValueRange``: ``start:end~r``."""

    start: Union[int, float]
    end: Union[int, float]
    r: Union[int, float]
    integer: bool

    def center(self, clock: float) -> float:
        clock = min(1.0, max(0.0, clock))  # as DeepSpeech: ranges stop at their ends
        return self.start + clock * (self.end - self.start)

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value this range can ever pick (over all clocks)."""
        lo, hi = min(self.start, self.end) - self.r, max(self.start, self.end) + self.r
        return (round(lo), round(hi)) if self.integer else (lo, hi)

    def pick(self, rng: np.random.Generator, clock: float) -> Union[int, float]:
        value = self.center(clock)
        if self.r:
            value = rng.uniform(value - self.r, value + self.r)
        return int(round(value)) if self.integer else float(value)

    def pick_many(self, rng: np.random.Generator, clock: float, n: int) -> np.ndarray:
        value = np.full(n, self.center(clock))
        if self.r:
            value = rng.uniform(value - self.r, value + self.r)
        return np.rint(value).astype(np.int64) if self.integer else value

    def __str__(self) -> str:
        text = str(self.start) if self.start == self.end else f"{self.start}:{self.end}"
        return f"{text}~{self.r}" if self.r else text


def parse_range(text: str, integer: bool) -> ValueRange:
    """``v``, ``a:b``, ``v~r`` or ``a:b~r``; raises ValueError naming the part it could not read."""
    kind = int if integer else float
    parts = text.split("~")
    if len(parts) > 2:
        raise ValueError(f"{text!r} has more than one '~'")
    bounds = parts[0].split(":")
    if len(bounds) > 2:
        raise ValueError(f"{text!r} has more than one ':'")

    def number(s: str):
        try:
            v = kind(s.strip())
        except ValueError:
            raise ValueError(f"{s.strip()!r} in {text!r} is not {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(v):
            raise ValueError(f"{s.strip()!r} in {text!r} is not finite")
        return v

    start = number(bounds[0])
    end = number(bounds[1]) if len(bounds) == 2 else start
    r = number(parts[1]) if len(parts) == 2 else kind(0)
    if r < 0:
        raise ValueError(f"radius {r} in {text!r} is negative")
    return ValueRange(start, end, r, integer)


# ----------------------------------------------------------------------------------------------------------
# Working representation


class _Work:
    """One utterance being augmented, held as log mel or as mel power; converted only when an op needs it."""

    __slots__ = ("x", "power")

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.power = False

    def log(self) -> np.ndarray:
        if self.power:
            np.maximum(self.x, _FLOOR_POW, out=self.x)  # features.py floors E at 1e-12 before its log
            np.log(self.x, out=self.x)
            self.x *= 0.5
            self.power = False
        return self.x

    def pow(self) -> np.ndarray:
        if not self.power:
            self.x *= 2.0
            np.exp(self.x, out=self.x)
            self.power = True
        return self.x

    def zero(self, domain: str) -> float:
        return zero_value(domain, self.power)


@dataclass
class _Ctx:
    rng: np.random.Generator
    clock: float
    frames_per_ms: float
    features: FeatureConfig
    min_frames: int


# ----------------------------------------------------------------------------------------------------------
# Operations


class ParsedOp:
    """An op read by :func:`parse_spec`: its spec, probability ``p`` and parameter values as attributes. Subclasses
    declare ``PARAMS`` as ``name -> (kind, default)``; this module's filterbank ops and preprocessing's waveform ops
    (:mod:`dstrain.prep.augment`) both are."""

    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[str, object]]] = {}
    ALIASES: ClassVar[dict[str, str]] = {}
    REFUSED: ClassVar[dict[str, str]] = {}
    """Parameters DeepSpeech had that cannot work here -> what to do instead."""

    def __init__(self, spec: str, p: float, values: dict[str, object]) -> None:
        self.spec = spec
        self.p = p
        for key, value in values.items():
            setattr(self, key, value)

    def validate(self) -> None:
        """Rejects values that can never work, at parse time rather than hours into the work."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class Augmentation(ParsedOp):
    """One parsed training-time ``--augment`` op."""

    domain: str = "spectrogram"

    @property
    def stage(self) -> int:
        return _STAGE_SPECTROGRAM if self.domain == "spectrogram" else _STAGE_FEATURES

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        raise NotImplementedError


def _fill(w: _Work, domain: str, fill: str) -> Union[float, np.ndarray]:
    if fill == "zero":
        return w.zero(domain)
    return w.log().mean(axis=0)  # per-channel mean over time (SpecAugment's normalised zero)


class FrequencyMask(Augmentation):
    name = "frequency_mask"
    PARAMS = {"n": ("int", "3"), "size": ("int", "2"), "fill": ("fill", "zero")}

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        n = self.n.pick(ctx.rng, ctx.clock)
        if n <= 0:
            return
        n_mel = w.x.shape[1]
        size = np.clip(self.size.pick_many(ctx.rng, ctx.clock, n), 1, max(1, n_mel - 1))
        f0 = ctx.rng.integers(0, np.maximum(1, n_mel - size))
        value = _fill(w, "spectrogram", self.fill)
        channels = np.arange(n_mel)
        masked = ((channels >= f0[:, None]) & (channels < (f0 + size)[:, None])).any(axis=0)
        w.x[:, masked] = value[masked] if isinstance(value, np.ndarray) else value


class TimeMask(Augmentation):
    name = "time_mask"
    PARAMS = {
        "n": ("int", "3"),
        "size": ("float", "10.0"),
        "domain": ("domain", "spectrogram"),
        "fill": ("fill", "zero"),
    }

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        n = self.n.pick(ctx.rng, ctx.clock)
        if n <= 0:
            return
        n_frames = w.x.shape[0]
        # DeepSpeech truncates ms * frames/ms to an int, then keeps at least one frame unmasked.
        size = (self.size.pick_many(ctx.rng, ctx.clock, n) * ctx.frames_per_ms).astype(np.int64)
        size = np.clip(size, 1, max(1, n_frames - 1))
        t0 = ctx.rng.integers(0, np.maximum(1, n_frames - size))
        edges = np.zeros(n_frames + 1, dtype=np.int64)
        np.add.at(edges, t0, 1)
        np.add.at(edges, np.minimum(t0 + size, n_frames), -1)
        masked = np.cumsum(edges[:-1]) > 0
        w.x[masked] = _fill(w, self.domain, self.fill)


class Dropout(Augmentation):
    name = "dropout"
    PARAMS = {"rate": ("float", "0.05"), "domain": ("domain", "spectrogram")}

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        # DeepSpeech's graph code keeps (not drops) a fraction `rate` (sign(floor(u + rate))); its docs say
        # rate is the fraction dropped, and that is what this does.
        rate = min(1.0, max(0.0, self.rate.pick(ctx.rng, ctx.clock)))
        if rate > 0:
            w.x[ctx.rng.random(w.x.shape, dtype=w.x.dtype) < rate] = w.zero(self.domain)


class _Gaussian(Augmentation):
    """Add and multiply: a draw of N(0, stddev) per value of the domain."""

    PARAMS = {"stddev": ("float", "5"), "domain": ("domain", "features")}

    def combine(self, x: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        stddev = self.stddev.pick(ctx.rng, ctx.clock)
        x = w.pow() if self.domain == "spectrogram" else w.log()
        g = ctx.rng.standard_normal(x.shape, dtype=x.dtype)
        g *= stddev
        self.combine(x, g)
        if w.power:  # negative power is silence (TensorFlow's Mfcc would take sqrt of it: NaN)
            np.maximum(x, 0.0, out=x)


class Add(_Gaussian):
    name = "add"

    def combine(self, x: np.ndarray, g: np.ndarray) -> None:
        x += g


class Multiply(_Gaussian):
    name = "multiply"

    def combine(self, x: np.ndarray, g: np.ndarray) -> None:
        g += 1.0
        x *= g


class Pitch(Augmentation):
    """DeepSpeech stretches the linear frequency axis (bilinear, bins above Nyquist are silence). Here each
    mel channel takes the mel power found at its centre frequency / pitch, interpolated between channel
    centres, with silence above the top filter edge. Exact in where energy moves; approximate in that a
    channel's bandwidth does not scale with it."""

    name = "pitch"
    PARAMS = {"pitch": ("float", "1.075~0.125")}

    def validate(self) -> None:
        if self.pitch.bounds()[0] <= 0:
            raise ValueError(f"pitch={self.pitch} can reach {self.pitch.bounds()[0]}; the factor must stay > 0")

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        factor = self.pitch.pick(ctx.rng, ctx.clock)
        n_mel = w.x.shape[1]
        if n_mel != ctx.features.n_mel:
            raise ValueError(
                f"pitch needs the filterbank geometry: got {n_mel} channels, FeatureConfig has {ctx.features.n_mel}"
            )
        centres, mel_low, spacing = _mel_geometry(ctx.features)
        pos = (_freq_to_mel(centres / factor) - mel_low) / spacing - 1.0  # fractional source channel
        pos = np.clip(pos, 0.0, n_mel)  # below channel 0: hold it; index n_mel is the silent top edge
        i0 = np.minimum(pos.astype(np.int64), n_mel - 1)
        frac = (pos - i0).astype(w.x.dtype)
        x = w.pow()
        padded = np.concatenate([x, np.zeros((x.shape[0], 1), x.dtype)], axis=1)
        w.x = padded[:, i0] * (1.0 - frac) + padded[:, i0 + 1] * frac


class Tempo(Augmentation):
    """As DeepSpeech: T / factor frames by TF1 bilinear resize (src = dst * T / T') of the power; here the
    mel power. Never fewer than ``min_frames`` (DeepSpeech: the transcript length) nor 1."""

    name = "tempo"
    PARAMS = {"factor": ("float", "1.1"), "max_time": ("number", -1.0)}

    def validate(self) -> None:
        if self.factor.bounds()[0] <= 0:
            raise ValueError(f"factor={self.factor} can reach {self.factor.bounds()[0]}; the factor must stay > 0")

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        factor = self.factor.pick(ctx.rng, ctx.clock)
        n_frames = w.x.shape[0]
        new = int(n_frames / factor)
        if self.max_time > 0:
            new = min(new, int(self.max_time * ctx.frames_per_ms))
        new = max(new, ctx.min_frames, 1)
        if new == n_frames:
            return
        src = np.arange(new) * (n_frames / new)
        i0 = np.minimum(src.astype(np.int64), n_frames - 1)
        i1 = np.minimum(i0 + 1, n_frames - 1)
        frac = (src - i0).astype(w.x.dtype)[:, None]
        x = w.pow()
        w.x = x[i0] * (1.0 - frac) + x[i1] * frac


class Warp(Augmentation):
    """DeepSpeech's warp: random shifts of an nt x nf grid of points (zero at the edges), upsampled by
    bicubic interpolation to a dense flow, applied by bilinear sampling (dense_image_warp). Differences:
    the frequency axis is mel channels, not FFT bins (shift sizes are relative, so the scale carries over);
    time and frequency shifts are drawn independently (DeepSpeech seeds both with the same seed); the
    upsampling maps corners to corners so the edges really have zero flow."""

    name = "warp"
    PARAMS = {"nt": ("int", "1"), "nf": ("int", "1"), "wt": ("float", "0.1"), "wf": ("float", "0.0")}
    ALIASES = {"num_t": "nt", "num_f": "nf", "warp_t": "wt", "warp_f": "wf"}

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        rng, clock = ctx.rng, ctx.clock
        nt, nf = self.nt.pick(rng, clock), self.nf.pick(rng, clock)
        wt, wf = self.wt.pick(rng, clock), self.wf.pick(rng, clock)
        if nt <= 0 or nf <= 0 or (wt == 0 and wf == 0):
            return
        n_frames, n_mel = w.x.shape
        # wt = 1 is a standard deviation of half the distance between grid lines, as in DeepSpeech
        scale = np.array([wt * n_frames / (2 * (nt + 1)), wf * n_mel / (2 * (nf + 1))])
        grid = np.zeros((2, nt + 2, nf + 2))
        grid[:, 1:-1, 1:-1] = rng.standard_normal((2, nt, nf)) * scale[:, None, None]
        wt_m, wf_m = _cubic_weights(nt + 2, n_frames), _cubic_weights(nf + 2, n_mel)
        flow = wt_m @ grid @ wf_m.T  # [2, T, F]
        qt = np.arange(n_frames)[:, None] - flow[0]
        qf = np.arange(n_mel)[None, :] - flow[1]
        w.x = _bilinear(w.pow(), qt, qf)


class Volume(Augmentation):
    """DeepSpeech's ``volume[dbfs=...]`` levels the waveform's peak to a target; a filterbank has no peak,
    so this takes a relative gain in dB. Silent (floored) values stay silent, as zeros do under a gain."""

    name = "volume"
    PARAMS = {"gain": ("float", "0~6")}
    REFUSED = {
        "dbfs": "dbfs levels a waveform's peak, which a filterbank store does not have; use volume[gain=<dB>] "
        "for a relative gain, or level the waveform while preprocessing: dstrain preprocess --augment "
        "'volume[dbfs=...]' --augment_copies K"
    }

    @property
    def stage(self) -> int:
        return _STAGE_SAMPLE

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        gain_db = self.gain.pick(ctx.rng, ctx.clock)
        x = w.x
        if w.power:
            np.multiply(x, 10.0 ** (gain_db / 10.0), out=x, where=x > _SILENT_POW)
        else:  # log(E) + log(10**(gain/20)): the same as the power factor, without exp/log
            np.add(x, gain_db * math.log(10.0) / 20.0, out=x, where=x > _SILENT_LOG)
            np.maximum(x, _FLOOR_LOG, out=x)


class Overlay(Augmentation):
    """DeepSpeech adds waveforms, scaling the noise by the ratio of peak levels and then restoring the
    sample's peak. Here noise layers add in mel power (independent sources add in power), the SNR is the
    ratio of mean mel powers, and the mix is scaled back to the sample's mean mel power. ``source`` is kept
    for the caller, who resolves it into ``noise_source``."""

    name = "overlay"
    PARAMS = {"source": ("str", None), "snr": ("float", "3.0"), "layers": ("int", "1")}
    noise_source: Optional[NoiseSource] = None

    @property
    def stage(self) -> int:
        return _STAGE_SAMPLE

    def apply(self, w: _Work, ctx: _Ctx) -> None:
        rng = ctx.rng
        layers = self.layers.pick(rng, ctx.clock)
        snr_db = self.snr.pick(rng, ctx.clock)
        if layers <= 0:
            return
        n_frames, n_mel = w.x.shape
        noise = np.zeros((n_frames, n_mel), dtype=w.x.dtype)
        for _ in range(layers):
            noise += np.exp(2.0 * _noise_frames(self.noise_source(rng, n_frames), rng, n_frames, n_mel, w.x.dtype))
        x = w.pow()
        speech_power, noise_power = float(x.mean(dtype=np.float64)), float(noise.mean(dtype=np.float64))
        if noise_power <= 0 or speech_power <= 0:
            return
        noise *= speech_power / (noise_power * 10.0 ** (snr_db / 10.0))
        x += noise
        x *= speech_power / float(x.mean(dtype=np.float64))


def _noise_frames(noise: np.ndarray, rng: np.random.Generator, n_frames: int, n_mel: int, dtype) -> np.ndarray:
    noise = np.asarray(noise)
    if noise.ndim != 2 or noise.shape[1] != n_mel or noise.shape[0] == 0:
        raise ValueError(f"overlay noise_source returned shape {noise.shape}; need [frames >= 1, {n_mel}] log mel")
    if noise.shape[0] < n_frames:
        noise = np.tile(noise, (-(-n_frames // noise.shape[0]), 1))
    offset = int(rng.integers(0, noise.shape[0] - n_frames + 1))
    return noise[offset : offset + n_frames].astype(dtype)


_OPS: dict[str, type[Augmentation]] = {
    cls.name: cls for cls in (FrequencyMask, TimeMask, Dropout, Add, Multiply, Pitch, Tempo, Warp, Volume, Overlay)
}
FILTERBANK_OPS: tuple[str, ...] = tuple(sorted(_OPS))
"""The ops of training-time ``--augment`` (preprocessing's ``--augment`` refuses them, naming this one)."""


# ----------------------------------------------------------------------------------------------------------
# Interpolation helpers


@functools.lru_cache(maxsize=8)
def _mel_geometry(cfg: FeatureConfig) -> tuple[np.ndarray, float, float]:
    """Channel centre frequencies (Hz), lowest mel and mel spacing, as features._mel_matrix lays them out."""
    mel_low, mel_high = float(_freq_to_mel(cfg.lower_hz)), float(_freq_to_mel(cfg.upper_hz))
    spacing = (mel_high - mel_low) / (cfg.n_mel + 1)
    centres_mel = mel_low + spacing * np.arange(1, cfg.n_mel + 1)
    return 700.0 * np.expm1(centres_mel / 1127.0), mel_low, spacing


@functools.lru_cache(maxsize=1024)  # per utterance length: recomputing them was a quarter of warp's cost
def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` cubic-convolution (Keys, a=-0.75 as TF's bicubic) weights, corners aligned."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    base = np.floor(src).astype(np.int64)
    t = src - base
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    a = -0.75
    for k in (-1, 0, 1, 2):
        d = np.abs(t - k)
        kernel = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
        kernel = np.where(d < 2, kernel, 0.0)
        np.add.at(weights, (rows, np.clip(base + k, 0, n_in - 1)), kernel)
    return weights


def _bilinear(x: np.ndarray, qt: np.ndarray, qf: np.ndarray) -> np.ndarray:
    """``x`` sampled at fractional ``(qt, qf)``, clamped to the edges (as tfa's dense_image_warp)."""
    n_frames, n_mel = x.shape

    def corners(q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.clip(q, 0.0, n - 1)
        i0 = np.minimum(q.astype(np.int64), max(n - 2, 0))
        return i0, np.minimum(i0 + 1, n - 1), (q - i0).astype(x.dtype)

    t0, t1, at = corners(qt, n_frames)
    f0, f1, af = corners(qf, n_mel)
    flat = x.ravel()
    r0, r1 = t0 * n_mel, t1 * n_mel
    top = flat[r0 + f0] * (1 - af) + flat[r0 + f1] * af
    bottom = flat[r1 + f0] * (1 - af) + flat[r1 + f1] * af
    return top * (1 - at) + bottom * at


# ----------------------------------------------------------------------------------------------------------
# Parsing


def parse_spec(
    spec: str,
    ops: Mapping[str, type],
    unknown: Callable[[str], str],
    kinds: Optional[Mapping[str, Callable[[str], object]]] = None,
) -> tuple[type, float, dict[str, object]]:
    """One ``NAME[p=...,key=value,...]`` of the op classes ``ops`` (each with ``PARAMS``: name -> (kind, default),
    ``ALIASES`` and ``REFUSED``: parameter -> why) -> (class, p, value of every parameter). Kinds ``int`` and
    ``float`` are :class:`ValueRange`, ``number`` a float, those in ``kinds`` what that parser returns, any other
    the string. ``unknown(name)`` words the error for a name not in ``ops``. Shared with preprocessing's waveform
    augmentation (:mod:`dstrain.prep.augment`), so both read DeepSpeech's syntax alike."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise ValueError(f"augmentation {spec!r}: expected NAME or NAME[key=value,...]")
    name = match.group("name")
    cls = ops.get(name)
    if cls is None:
        raise ValueError(f"augmentation {spec!r}: {unknown(name)}")
    given: dict[str, str] = {}
    params = match.group("params")
    for part in [] if params is None or not params.strip() else params.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key:
            raise ValueError(f"augmentation {spec!r}: {part.strip()!r} is not key=value")
        if key in cls.REFUSED:
            raise ValueError(f"augmentation {spec!r}: {cls.REFUSED[key]}")
        key = cls.ALIASES.get(key, key)
        if key != "p" and key not in cls.PARAMS:
            raise ValueError(
                f"augmentation {spec!r}: unknown parameter {key!r} for {name} (known: p, {', '.join(cls.PARAMS)})"
            )
        if key in given:
            raise ValueError(f"augmentation {spec!r}: parameter {key!r} given twice")
        given[key] = value

    try:
        p = float(given.get("p", "1.0"))
    except ValueError:
        raise ValueError(f"augmentation {spec!r}: p={given['p']!r} is not a number") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"augmentation {spec!r}: p={p} is not a probability in [0, 1]")

    values: dict[str, object] = {}
    for key, (kind, default) in cls.PARAMS.items():
        raw = given.get(key, default)
        try:
            if kind in ("int", "float"):
                values[key] = parse_range(str(raw), integer=kind == "int")
            elif kind == "number":
                values[key] = float(raw)
            elif kinds and kind in kinds:
                values[key] = kinds[kind](raw)
            else:
                values[key] = raw
        except ValueError as e:
            raise ValueError(f"augmentation {spec!r}: {key}: {e}") from None
    return cls, p, values


WAVEFORM_OPS = ("codec", "resample", "reverb", "speed")
"""Ops that need the waveform: :mod:`dstrain.prep.augment` makes them into stored copies at preprocessing; here
they are refused with that advice (as are ``overlay`` of audio files and ``volume[dbfs]``, which preprocessing has)."""

_AT_PREPROCESSING = (
    "make augmented copies while preprocessing: dstrain preprocess --augment '{spec}' --augment_copies K"
)


def _domain(raw: str) -> str:
    if raw == "signal":
        raise ValueError(
            "domain=signal needs audio, but the feature store holds log mel filterbanks; use domain=spectrogram "
            "(mel power) or domain=features (log mel), or augment the waveform when preprocessing "
            "(dstrain preprocess --augment ... --augment_copies K)"
        )
    if raw not in ("spectrogram", "features"):
        raise ValueError(f"unknown domain {raw!r} (use spectrogram or features)")
    return raw


def _fill_kind(raw: str) -> str:
    if raw not in ("zero", "mean"):
        raise ValueError(f"unknown fill {raw!r} (use zero or mean)")
    return raw


def _parse_one(spec: str, noise_source) -> Augmentation:
    def unknown(name: str) -> str:
        if name in WAVEFORM_OPS:
            return (
                f"{name} needs the waveform, and the feature store holds log mel filterbanks; "
                + _AT_PREPROCESSING.format(spec=spec.strip())
            )
        return f"unknown augmentation {name!r} (known: {', '.join(sorted(_OPS))})"

    cls, p, values = parse_spec(spec, _OPS, unknown, {"domain": _domain, "fill": _fill_kind})
    aug = cls(spec, p, values)
    try:
        aug.validate()
    except ValueError as e:
        raise ValueError(f"augmentation {spec!r}: {e}") from None
    if isinstance(aug, Overlay):
        aug.noise_source = _resolve_noise(spec, aug.source, noise_source)
    return aug


_UNRESOLVED = object()  # parse only: overlays keep no noise source (see overlay_sources)


def _resolve_noise(spec: str, source: Optional[str], noise_source) -> Optional[NoiseSource]:
    if noise_source is _UNRESOLVED:
        return None
    if noise_source is None:
        raise ValueError(
            f"augmentation {spec!r}: overlay needs noise, but no noise_source was given to parse_augmentations"
        )
    if isinstance(noise_source, Mapping):
        if source not in noise_source:
            raise ValueError(f"augmentation {spec!r}: no noise_source for source={source!r}")
        return noise_source[source]
    return noise_source


def parse_augmentations(
    specs: Optional[Sequence[str]],
    noise_source: Union[NoiseSource, Mapping[str, NoiseSource], None] = None,
) -> list[Augmentation]:
    """Parses ``--augment`` values; ValueError names the spec and the part that is wrong.

    ``noise_source`` feeds ``overlay``: one callable for all overlays, or a mapping from each overlay's
    ``source=`` string to its callable (this module never opens stores itself).
    """
    if isinstance(specs, str):  # a bare string would otherwise parse letter by letter
        specs = [specs]
    return [_parse_one(spec, noise_source) for spec in specs or ()]


LOADER_ONLY: tuple[str, ...] = ("overlay",)
"""Ops that need more than the batch (``overlay`` reads noise utterances from another store): the loader applies them;
the device applies the others (:mod:`dstrain.loader.device_augment`)."""


def split_ops(augmentations: Sequence[Augmentation]) -> tuple[list[Augmentation], list[Augmentation]]:
    """(ops for the loader, ops for the device), in the order they run (DeepSpeech's domain order, then the command
    line's): the loader takes everything up to the last of :data:`LOADER_ONLY`, so that no op changes places."""
    ordered = sorted(augmentations, key=lambda a: a.stage)
    last = max((i for i, a in enumerate(ordered) if a.name in LOADER_ONLY), default=-1)
    return ordered[: last + 1], ordered[last + 1 :]


def expand_specs(specs: Sequence[str]) -> list[str]:
    """``--augment`` values with ``default`` replaced by :data:`DEFAULT_AUGMENT`."""
    return [s for a in specs for s in (DEFAULT_AUGMENT if a == "default" else (a,))]


def overlay_sources(specs: Sequence[str]) -> list[str]:
    """The ``source=`` of every overlay in ``specs`` (parsed, so a bad spec fails here already), in order, once each:
    what the caller must open as noise before :func:`parse_augmentations`."""
    sources = [a.source for a in parse_augmentations(specs, _UNRESOLVED) if isinstance(a, Overlay) and a.source]
    return list(dict.fromkeys(sources))


# ----------------------------------------------------------------------------------------------------------
# Applying


class Augmenter:
    """Applies parsed augmentations to one utterance's log mel at a time."""

    def __init__(
        self,
        augmentations: Sequence[Augmentation],
        features: Optional[FeatureConfig] = None,
        step_ms: Optional[float] = None,
    ) -> None:
        self.features = features if features is not None else FeatureConfig()
        self.step_ms = float(step_ms if step_ms is not None else self.features.step_ms)
        if self.step_ms <= 0:
            raise ValueError(f"step_ms={self.step_ms} must be > 0")
        # DeepSpeech's order: sample-domain ops, then spectrogram, then features; stable within a domain.
        self.augmentations = tuple(sorted(augmentations, key=lambda a: a.stage))

    @classmethod
    def from_specs(
        cls,
        specs: Optional[Sequence[str]],
        noise_source: Union[NoiseSource, Mapping[str, NoiseSource], None] = None,
        features: Optional[FeatureConfig] = None,
        step_ms: Optional[float] = None,
    ) -> "Augmenter":
        return cls(parse_augmentations(specs, noise_source), features=features, step_ms=step_ms)

    def __len__(self) -> int:
        return len(self.augmentations)

    def __bool__(self) -> bool:
        return bool(self.augmentations)

    def apply(
        self, log_mel: np.ndarray, rng: np.random.Generator, clock: float = 0.0, min_frames: int = 1
    ) -> np.ndarray:
        """A new ``[T', n_mel]`` array of ``log_mel``'s dtype; ``clock`` is training progress 0..1.

        ``min_frames`` bounds how short tempo may make it (pass what CTC needs for the labels); >= 1 always.
        """
        log_mel = np.asarray(log_mel)
        if log_mel.ndim != 2 or log_mel.shape[0] == 0:
            raise ValueError(f"expected log mel [frames >= 1, n_mel], got shape {log_mel.shape}")
        if not np.issubdtype(log_mel.dtype, np.floating):
            raise ValueError(f"expected a float log mel array, got {log_mel.dtype}")
        work_dtype = np.float64 if log_mel.dtype == np.float64 else np.float32
        w = _Work(np.array(log_mel, dtype=work_dtype, copy=True))
        ctx = _Ctx(rng, min(1.0, max(0.0, float(clock))), 1.0 / self.step_ms, self.features, max(1, int(min_frames)))
        for aug in self.augmentations:
            if rng.random() < aug.p:  # p=0 never (random() >= 0), p=1 always (random() < 1)
                aug.apply(w, ctx)
        return w.log().astype(log_mel.dtype, copy=False)
