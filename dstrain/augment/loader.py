"""The filterbank ops that run on the loader threads, in numpy, as batches are assembled: ``overlay`` (it reads noise
utterances from another store, which the training step cannot) and any ``volume`` that runs before one
(:func:`dstrain.augment.filterbank.split_ops`). Every other op runs on the device (:mod:`dstrain.augment.device`).

Randomness: a sample's numbers come from :func:`sample_rng` of (``--random_seed``, epoch, sample id), so any thread,
rank or resume draws the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from dstrain.augment.filterbank import (
    FLOOR_LOG,
    FLOOR_POW,
    SILENT_LOG,
    SILENT_POW,
    Augmentation,
    NoiseSource,
    Overlay,
    Volume,
    parse_augmentations,
    placed,
    zero_value,
)
from dstrain.features import FeatureConfig

_SEED_DOMAIN = 0x61756761  # keeps these streams apart from any other use of the same (seed, epoch, key)


def sample_rng(seed: int, epoch: int, sample_key: int) -> np.random.Generator:
    """A Generator determined by ``(seed, epoch, sample_key)`` alone, so any thread gets the same draws."""
    entropy = [int(v) % (1 << 64) for v in (seed, epoch, sample_key)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(_SEED_DOMAIN,))))


class Work:
    """One utterance being augmented, held as log mel or as mel power; converted only when an op needs it."""

    __slots__ = ("x", "power")

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.power = False

    def log(self) -> np.ndarray:
        if self.power:
            np.maximum(self.x, FLOOR_POW, out=self.x)  # features.py floors E at 1e-12 before its log
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
class Context:
    """What an op sees besides the utterance."""

    rng: np.random.Generator
    clock: float
    frames_per_ms: float
    features: FeatureConfig
    min_frames: int


Op = Callable[[Augmentation, Work, Context], None]
"""An op's numpy implementation: (the parsed op, the utterance, its context) -> None, changing the utterance."""


def volume(op: Volume, w: Work, ctx: Context) -> None:
    gain_db = op.gain.pick(ctx.rng, ctx.clock)
    x = w.x
    if w.power:
        np.multiply(x, 10.0 ** (gain_db / 10.0), out=x, where=x > SILENT_POW)
    else:  # log(E) + log(10**(gain/20)): the same as the power factor, without exp/log
        np.add(x, gain_db * math.log(10.0) / 20.0, out=x, where=x > SILENT_LOG)
        np.maximum(x, FLOOR_LOG, out=x)


def overlay(op: Overlay, w: Work, ctx: Context) -> None:
    rng = ctx.rng
    layers = op.layers.pick(rng, ctx.clock)
    snr_db = op.snr.pick(rng, ctx.clock)
    if layers <= 0:
        return
    n_frames, n_mel = w.x.shape
    noise = np.zeros((n_frames, n_mel), dtype=w.x.dtype)
    for _ in range(layers):
        noise += np.exp(2.0 * _noise_frames(op.noise_source(rng, n_frames), rng, n_frames, n_mel, w.x.dtype))
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


class LoaderAugmenter:
    """Applies parsed augmentations to one utterance's log mel at a time, each op by its entry in :attr:`OPS`."""

    OPS: ClassVar[Mapping[type[Augmentation], Op]] = {Volume: volume, Overlay: overlay}
    """The implementation of each op class this augmenter can run."""

    def __init__(
        self,
        augmentations: Sequence[Augmentation],
        features: Optional[FeatureConfig] = None,
        step_ms: Optional[float] = None,
    ) -> None:
        self.augmentations, self.features, self.step_ms = placed(
            augmentations, self.OPS, "loader", "device", features, step_ms
        )

    @classmethod
    def from_specs(
        cls,
        specs: Optional[Sequence[str]],
        noise_source: Union[NoiseSource, Mapping[str, NoiseSource], None] = None,
        features: Optional[FeatureConfig] = None,
        step_ms: Optional[float] = None,
    ) -> "LoaderAugmenter":
        return cls(parse_augmentations(specs, noise_source), features=features, step_ms=step_ms)

    def __len__(self) -> int:
        return len(self.augmentations)

    def __bool__(self) -> bool:
        return bool(self.augmentations)

    def apply(
        self, log_mel: np.ndarray, rng: np.random.Generator, clock: float = 0.0, min_frames: int = 1
    ) -> np.ndarray:
        """A new ``[T', n_mel]`` array of ``log_mel``'s dtype; ``clock`` is training progress 0..1.

        ``min_frames`` bounds how short an op may make it (pass what CTC needs for the labels); >= 1 always.
        """
        log_mel = np.asarray(log_mel)
        if log_mel.ndim != 2 or log_mel.shape[0] == 0:
            raise ValueError(f"expected log mel [frames >= 1, n_mel], got shape {log_mel.shape}")
        if not np.issubdtype(log_mel.dtype, np.floating):
            raise ValueError(f"expected a float log mel array, got {log_mel.dtype}")
        work_dtype = np.float64 if log_mel.dtype == np.float64 else np.float32
        w = Work(np.array(log_mel, dtype=work_dtype, copy=True))
        ctx = Context(rng, min(1.0, max(0.0, float(clock))), 1.0 / self.step_ms, self.features, max(1, int(min_frames)))
        for aug in self.augmentations:
            if rng.random() < aug.p:  # p=0 never (random() >= 0), p=1 always (random() < 1)
                self.OPS[type(aug)](aug, w, ctx)
        return w.log().astype(log_mel.dtype, copy=False)
