"""Training-time augmentation of stored log mel filterbanks (``dstrain train --augment``): each op declared once, with
its parameters, where it runs, the random numbers it draws on the device and how much it can lengthen an utterance.
Their implementations: :mod:`dstrain.augment.device` (TensorFlow, in the training step: every op but ``overlay``) and
:mod:`dstrain.augment.loader` (numpy on the loader threads: ``overlay``, which reads another store, and any ``volume``
that must run before it, :func:`split_ops`). The syntax is :mod:`dstrain.augment.spec`'s.

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
refused here: :mod:`dstrain.augment.waveform` applies them at preprocessing into stored, labelled copies
(``dstrain preprocess --augment ... --augment_copies K``), and the errors say so.

``fill=mean`` (an extension) masks with each channel's mean log mel over the utterance, which is what
SpecAugment's zero is after per-channel mean normalisation; DeepSpeech's ``fill=zero`` writes silence.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Collection, Mapping, Optional, Sequence, Union

import numpy as np

from dstrain.augment.spec import DEVICE, LOADER, ParsedOp, parse_spec
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

FLOOR_LOG = math.log(_FILTERBANK_FLOOR)
"""Silence in log mel: the floor features.py puts under the filterbank before its log."""
FLOOR_POW = _FILTERBANK_FLOOR**2
"""Silence in mel power."""
# At or below this a value is the floor (digital silence); float16 stores the floor 0.006 higher.
SILENT_LOG = FLOOR_LOG + 0.05
SILENT_POW = math.exp(2 * SILENT_LOG)


def zero_value(domain: str, power: bool) -> float:
    """The value that is 0 in ``domain`` (spectrogram or gain), in the power or the log representation (masks need no
    conversion): shared by the loader's and the device's implementations."""
    if domain == "spectrogram":
        return 0.0 if power else FLOOR_LOG
    return 1.0 if power else 0.0


@functools.lru_cache(maxsize=8)
def mel_geometry(cfg: FeatureConfig) -> tuple[np.ndarray, float, float]:
    """Channel centre frequencies (Hz), lowest mel and mel spacing, as features._mel_matrix lays them out (pitch)."""
    mel_low, mel_high = float(_freq_to_mel(cfg.lower_hz)), float(_freq_to_mel(cfg.upper_hz))
    spacing = (mel_high - mel_low) / (cfg.n_mel + 1)
    centres_mel = mel_low + spacing * np.arange(1, cfg.n_mel + 1)
    return 700.0 * np.expm1(centres_mel / 1127.0), mel_low, spacing


_STAGE_SAMPLE, _STAGE_SPECTROGRAM, _STAGE_FEATURES = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# The ops


class Augmentation(ParsedOp):
    """One parsed training-time ``--augment`` op."""

    RUNS = (DEVICE,)
    domain: str = "spectrogram"

    @property
    def stage(self) -> int:
        return _STAGE_SPECTROGRAM if self.domain == "spectrogram" else _STAGE_FEATURES

    def draws(self) -> int:
        """The random numbers the device draws for it per sample, its ``p`` draw included (a fixed count, sized by
        the parameters' largest values, so that every later op's draws stay where they are)."""
        return 2  # p and the op's one parameter

    def stretch(self) -> float:
        """The most it lengthens an utterance (the loader plans batches for it)."""
        return 1.0


class _Mask(Augmentation):
    def draws(self) -> int:
        return 2 + 2 * max(0, self.n.bounds()[1])  # p, n, then a size and a start per mask


class FrequencyMask(_Mask):
    name = "frequency_mask"
    PARAMS = {"n": ("int", "3"), "size": ("int", "2"), "fill": ("fill", "zero")}


class TimeMask(_Mask):
    name = "time_mask"
    PARAMS = {
        "n": ("int", "3"),
        "size": ("float", "10.0"),
        "domain": ("domain", "spectrogram"),
        "fill": ("fill", "zero"),
    }


class Dropout(Augmentation):
    """DeepSpeech's graph code keeps (not drops) a fraction ``rate`` (sign(floor(u + rate))); its docs say rate is
    the fraction dropped, and that is what this does."""

    name = "dropout"
    PARAMS = {"rate": ("float", "0.05"), "domain": ("domain", "spectrogram")}


class Add(Augmentation):
    name = "add"
    PARAMS = {"stddev": ("float", "5"), "domain": ("domain", "features")}


class Multiply(Augmentation):
    name = "multiply"
    PARAMS = {"stddev": ("float", "5"), "domain": ("domain", "features")}


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


class Tempo(Augmentation):
    """As DeepSpeech: T / factor frames by TF1 bilinear resize (src = dst * T / T') of the power; here the
    mel power. Never fewer than ``min_frames`` (DeepSpeech: the transcript length) nor 1."""

    name = "tempo"
    PARAMS = {"factor": ("float", "1.1"), "max_time": ("number", -1.0)}

    def validate(self) -> None:
        if self.factor.bounds()[0] <= 0:
            raise ValueError(f"factor={self.factor} can reach {self.factor.bounds()[0]}; the factor must stay > 0")

    def stretch(self) -> float:
        return max(1.0, 1.0 / self.factor.bounds()[0])  # T / factor frames


class Warp(Augmentation):
    """DeepSpeech's warp: random shifts of an nt x nf grid of points (zero at the edges), upsampled by
    bicubic interpolation to a dense flow, applied by bilinear sampling (dense_image_warp). Differences:
    the frequency axis is mel channels, not FFT bins (shift sizes are relative, so the scale carries over);
    time and frequency shifts are drawn independently (DeepSpeech seeds both with the same seed); the
    upsampling maps corners to corners so the edges really have zero flow."""

    name = "warp"
    PARAMS = {"nt": ("int", "1"), "nf": ("int", "1"), "wt": ("float", "0.1"), "wf": ("float", "0.0")}
    ALIASES = {"num_t": "nt", "num_f": "nf", "warp_t": "wt", "warp_f": "wf"}

    def draws(self) -> int:
        # p, nt, nf, wt, wf, then two uniforms per normal of the 2 x nt x nf grid
        return 5 + 4 * max(0, self.nt.bounds()[1]) * max(0, self.nf.bounds()[1])


class Volume(Augmentation):
    """DeepSpeech's ``volume[dbfs=...]`` levels the waveform's peak to a target; a filterbank has no peak,
    so this takes a relative gain in dB. Silent (floored) values stay silent, as zeros do under a gain. On the
    device, or on the loader where it must run before an ``overlay``."""

    name = "volume"
    PARAMS = {"gain": ("float", "0~6")}
    REFUSED = {
        "dbfs": "dbfs levels a waveform's peak, which a filterbank store does not have; use volume[gain=<dB>] "
        "for a relative gain, or level the waveform while preprocessing: dstrain preprocess --augment "
        "'volume[dbfs=...]' --augment_copies K"
    }
    RUNS = (DEVICE, LOADER)

    @property
    def stage(self) -> int:
        return _STAGE_SAMPLE


class Overlay(Augmentation):
    """DeepSpeech adds waveforms, scaling the noise by the ratio of peak levels and then restoring the
    sample's peak. Here noise layers add in mel power (independent sources add in power), the SNR is the
    ratio of mean mel powers, and the mix is scaled back to the sample's mean mel power. ``source`` is kept
    for the caller, who resolves it into ``noise_source``. Only on the loader: it reads another store."""

    name = "overlay"
    PARAMS = {"source": ("str", None), "snr": ("float", "3.0"), "layers": ("int", "1")}
    RUNS = (LOADER,)
    noise_source: Optional[NoiseSource] = None

    @property
    def stage(self) -> int:
        return _STAGE_SAMPLE

    def draws(self) -> int:
        raise NotImplementedError("overlay runs on the loader, which draws from numpy's generator as it goes")


OPS: dict[str, type[Augmentation]] = {
    cls.name: cls for cls in (FrequencyMask, TimeMask, Dropout, Add, Multiply, Pitch, Tempo, Warp, Volume, Overlay)
}
"""Training's ``--augment`` ops by name."""
FILTERBANK_OPS: tuple[str, ...] = tuple(sorted(OPS))
"""The ops of training-time ``--augment`` (preprocessing's ``--augment`` refuses them, naming this one)."""
DEVICE_OPS: tuple[str, ...] = tuple(sorted(name for name, cls in OPS.items() if DEVICE in cls.RUNS))
"""The ops that run on the device (:mod:`dstrain.augment.device`)."""
LOADER_ONLY: tuple[str, ...] = tuple(sorted(name for name, cls in OPS.items() if DEVICE not in cls.RUNS))
"""Ops that need more than the batch (``overlay`` reads noise utterances from another store): the loader applies them
and any op that must run before them (:func:`split_ops`)."""


# ----------------------------------------------------------------------------------------------------------
# Parsing

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
        # Imported here: waveform.py imports this module, and training needs its codecs only to word this error.
        from dstrain.augment.waveform import OPS as WAVEFORM

        if name in WAVEFORM:
            return (
                f"{name} needs the waveform, and the feature store holds log mel filterbanks; "
                + _AT_PREPROCESSING.format(spec=spec.strip())
            )
        return f"unknown augmentation {name!r} (known: {', '.join(sorted(OPS))})"

    cls, p, values = parse_spec(spec, OPS, unknown, {"domain": _domain, "fill": _fill_kind})
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


def in_order(augmentations: Sequence[Augmentation]) -> list[Augmentation]:
    """DeepSpeech's order: sample-domain ops, then spectrogram, then features; the command line's within a domain."""
    return sorted(augmentations, key=lambda a: a.stage)


def placed(
    augmentations: Sequence[Augmentation],
    implemented: Collection[type],
    where: str,
    other: str,
    features: Optional[FeatureConfig],
    step_ms: Optional[float],
) -> tuple[tuple[Augmentation, ...], FeatureConfig, float]:
    """What the loader's and the device's augmenters both start with: ``augmentations`` in the order they run, each
    one ``where`` implements (else one error naming the other side), the feature settings and the frame step."""
    refused = [a.spec for a in augmentations if type(a) not in implemented]
    if refused:
        raise ValueError(
            f"augmentation {refused[0]!r} cannot run on the {where} (only "
            f"{', '.join(sorted(c.name for c in implemented))} can); let the {other} apply it "
            "(dstrain.augment.filterbank.split_ops)"
        )
    features = features if features is not None else FeatureConfig()
    step = float(step_ms if step_ms is not None else features.step_ms)
    if step <= 0:
        raise ValueError(f"step_ms={step} must be > 0")
    return tuple(in_order(augmentations)), features, step


def split_ops(augmentations: Sequence[Augmentation]) -> tuple[list[Augmentation], list[Augmentation]]:
    """(ops for the loader, ops for the device), in the order they run: the loader takes everything up to the last of
    :data:`LOADER_ONLY`, so that no op changes places (only sample-domain ops, volume and overlay, can precede one)."""
    ordered = in_order(augmentations)
    last = max((i for i, a in enumerate(ordered) if DEVICE not in a.RUNS), default=-1)
    return ordered[: last + 1], ordered[last + 1 :]


def expand_specs(specs: Sequence[str]) -> list[str]:
    """``--augment`` values with ``default`` replaced by :data:`DEFAULT_AUGMENT`."""
    return [s for a in specs for s in (DEFAULT_AUGMENT if a == "default" else (a,))]


def overlay_sources(specs: Sequence[str]) -> list[str]:
    """The ``source=`` of every overlay in ``specs`` (parsed, so a bad spec fails here already), in order, once each:
    what the caller must open as noise before :func:`parse_augmentations`."""
    sources = [a.source for a in parse_augmentations(specs, _UNRESOLVED) if isinstance(a, Overlay) and a.source]
    return list(dict.fromkeys(sources))
