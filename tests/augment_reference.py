"""The filterbank ops of training's ``--augment`` in numpy, one utterance at a time: the reference the device's
TensorFlow ops (dstrain/augment/device.py) are held to, and what tests/test_augment.py checks against the spec.

Training never runs these: the device runs every op but ``overlay``, and the loader (dstrain/augment/loader.py) runs
``overlay`` and the ``volume`` before one. :class:`Augmenter` is the loader's augmenter with the other eight ops added,
so a chain draws from numpy's generator exactly as the loader did when it ran them all.
"""

from __future__ import annotations

import functools
from typing import Union

import numpy as np

from dstrain.augment.filterbank import (
    Add,
    Dropout,
    FrequencyMask,
    Multiply,
    Pitch,
    Tempo,
    TimeMask,
    Warp,
    mel_geometry,
)
from dstrain.augment.loader import Context, LoaderAugmenter, Work
from dstrain.features import _freq_to_mel


def _fill(w: Work, domain: str, fill: str) -> Union[float, np.ndarray]:
    if fill == "zero":
        return w.zero(domain)
    return w.log().mean(axis=0)  # per-channel mean over time (SpecAugment's normalised zero)


def frequency_mask(op: FrequencyMask, w: Work, ctx: Context) -> None:
    n = op.n.pick(ctx.rng, ctx.clock)
    if n <= 0:
        return
    n_mel = w.x.shape[1]
    size = np.clip(op.size.pick_many(ctx.rng, ctx.clock, n), 1, max(1, n_mel - 1))
    f0 = ctx.rng.integers(0, np.maximum(1, n_mel - size))
    value = _fill(w, "spectrogram", op.fill)
    channels = np.arange(n_mel)
    masked = ((channels >= f0[:, None]) & (channels < (f0 + size)[:, None])).any(axis=0)
    w.x[:, masked] = value[masked] if isinstance(value, np.ndarray) else value


def time_mask(op: TimeMask, w: Work, ctx: Context) -> None:
    n = op.n.pick(ctx.rng, ctx.clock)
    if n <= 0:
        return
    n_frames = w.x.shape[0]
    # DeepSpeech truncates ms * frames/ms to an int, then keeps at least one frame unmasked.
    size = (op.size.pick_many(ctx.rng, ctx.clock, n) * ctx.frames_per_ms).astype(np.int64)
    size = np.clip(size, 1, max(1, n_frames - 1))
    t0 = ctx.rng.integers(0, np.maximum(1, n_frames - size))
    edges = np.zeros(n_frames + 1, dtype=np.int64)
    np.add.at(edges, t0, 1)
    np.add.at(edges, np.minimum(t0 + size, n_frames), -1)
    masked = np.cumsum(edges[:-1]) > 0
    w.x[masked] = _fill(w, op.domain, op.fill)


def dropout(op: Dropout, w: Work, ctx: Context) -> None:
    rate = min(1.0, max(0.0, op.rate.pick(ctx.rng, ctx.clock)))
    if rate > 0:
        w.x[ctx.rng.random(w.x.shape, dtype=w.x.dtype) < rate] = w.zero(op.domain)


def gaussian(op: Union[Add, Multiply], w: Work, ctx: Context) -> None:
    """Add and multiply: a draw of N(0, stddev) per value of the domain."""
    stddev = op.stddev.pick(ctx.rng, ctx.clock)
    x = w.pow() if op.domain == "spectrogram" else w.log()
    g = ctx.rng.standard_normal(x.shape, dtype=x.dtype)
    g *= stddev
    if isinstance(op, Add):
        x += g
    else:
        g += 1.0
        x *= g
    if w.power:  # negative power is silence (TensorFlow's Mfcc would take sqrt of it: NaN)
        np.maximum(x, 0.0, out=x)


def pitch(op: Pitch, w: Work, ctx: Context) -> None:
    factor = op.pitch.pick(ctx.rng, ctx.clock)
    n_mel = w.x.shape[1]
    if n_mel != ctx.features.n_mel:
        raise ValueError(
            f"pitch needs the filterbank geometry: got {n_mel} channels, FeatureConfig has {ctx.features.n_mel}"
        )
    centres, mel_low, spacing = mel_geometry(ctx.features)
    pos = (_freq_to_mel(centres / factor) - mel_low) / spacing - 1.0  # fractional source channel
    pos = np.clip(pos, 0.0, n_mel)  # below channel 0: hold it; index n_mel is the silent top edge
    i0 = np.minimum(pos.astype(np.int64), n_mel - 1)
    frac = (pos - i0).astype(w.x.dtype)
    x = w.pow()
    padded = np.concatenate([x, np.zeros((x.shape[0], 1), x.dtype)], axis=1)
    w.x = padded[:, i0] * (1.0 - frac) + padded[:, i0 + 1] * frac


def tempo(op: Tempo, w: Work, ctx: Context) -> None:
    factor = op.factor.pick(ctx.rng, ctx.clock)
    n_frames = w.x.shape[0]
    new = int(n_frames / factor)
    if op.max_time > 0:
        new = min(new, int(op.max_time * ctx.frames_per_ms))
    new = max(new, ctx.min_frames, 1)
    if new == n_frames:
        return
    src = np.arange(new) * (n_frames / new)
    i0 = np.minimum(src.astype(np.int64), n_frames - 1)
    i1 = np.minimum(i0 + 1, n_frames - 1)
    frac = (src - i0).astype(w.x.dtype)[:, None]
    x = w.pow()
    w.x = x[i0] * (1.0 - frac) + x[i1] * frac


def warp(op: Warp, w: Work, ctx: Context) -> None:
    rng, clock = ctx.rng, ctx.clock
    nt, nf = op.nt.pick(rng, clock), op.nf.pick(rng, clock)
    wt, wf = op.wt.pick(rng, clock), op.wf.pick(rng, clock)
    if nt <= 0 or nf <= 0 or (wt == 0 and wf == 0):
        return
    n_frames, n_mel = w.x.shape
    # wt = 1 is a standard deviation of half the distance between grid lines, as in DeepSpeech
    scale = np.array([wt * n_frames / (2 * (nt + 1)), wf * n_mel / (2 * (nf + 1))])
    grid = np.zeros((2, nt + 2, nf + 2))
    grid[:, 1:-1, 1:-1] = rng.standard_normal((2, nt, nf)) * scale[:, None, None]
    wt_m, wf_m = cubic_weights(nt + 2, n_frames), cubic_weights(nf + 2, n_mel)
    flow = wt_m @ grid @ wf_m.T  # [2, T, F]
    qt = np.arange(n_frames)[:, None] - flow[0]
    qf = np.arange(n_mel)[None, :] - flow[1]
    w.x = bilinear(w.pow(), qt, qf)


@functools.lru_cache(maxsize=1024)
def cubic_weights(n_in: int, n_out: int) -> np.ndarray:
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


def bilinear(x: np.ndarray, qt: np.ndarray, qf: np.ndarray) -> np.ndarray:
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


class Augmenter(LoaderAugmenter):
    """Every filterbank op, in numpy: the loader's (volume, overlay) and this module's."""

    OPS = {
        **LoaderAugmenter.OPS,
        FrequencyMask: frequency_mask,
        TimeMask: time_mask,
        Dropout: dropout,
        Add: gaussian,
        Multiply: gaussian,
        Pitch: pitch,
        Tempo: tempo,
        Warp: warp,
    }
