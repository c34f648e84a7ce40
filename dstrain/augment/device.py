"""Training-time augmentation on the device: the filterbank ops of :mod:`dstrain.augment.filterbank` as TensorFlow ops
over a padded batch, run inside the training step just before the model (never for evaluation or export).

Why on the device: in numpy on the loader threads the ops held the GIL for most of their time, so a process delivered
about a third of its unaugmented frames per second whatever its thread count; on a GPU the same work is a few hundred
small kernels per step (on a CPU-only run, ~15-20 ms of one core per batch of 32 utterances for ``--augment
default``: ``benchmarks/loader.py`` times it). The loader keeps what needs other data: ``overlay`` reads noise
utterances from another store, so the ops up to the last overlay (in the order ops run) stay on the loader and the
device runs the rest, the order kept (:func:`dstrain.augment.filterbank.split_ops`, :mod:`dstrain.augment.loader`).

Randomness: every number an op draws is a function of (``--random_seed``, epoch, sample id, op, draw) alone; each
batch carries its samples' (epoch, sample id) as ``keys`` ``[B, 2]`` int64. A sample is therefore augmented alike
whatever its batch-mates, its padding, the number of ranks or a resume in between. (Only ``fill=mean`` sums over an
utterance's frames, a reduction whose float rounding may differ with the padded length: at most a few ulps.)
TensorFlow's stateless random ops take one seed per call, and vectorising them over per-sample seeds falls back to a
loop over the batch (``pfor``), so the numbers come from a counter-based integer hash instead (an xorshift-multiply
mixer on 32-bit words held in int64), vectorised over samples, draws and elements. They are not numpy's draws (the
loader's, or the numpy reference the tests hold these ops to): a spec gives statistically the same augmentation either
way, not the same numbers.

Each op draws a fixed number of values per sample (:meth:`~dstrain.augment.filterbank.Augmentation.draws`, sized by its
parameters' largest values), and a sample its ``p`` draw leaves out keeps its values.

Example::

    augment = DeviceAugmenter(parse_augmentations(DEFAULT_AUGMENT), seed=4568, epochs=30, features=store.features)
    x, x_len = augment(x, x_len, y, y_len, keys)   # inside the training step, before the model

(:meth:`dstrain.loader.builder.TrainInput.device_augmenter` builds it from ``--augment`` for the trainer.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import tensorflow as tf

from dstrain.augment.filterbank import (
    FLOOR_LOG,
    FLOOR_POW,
    SILENT_LOG,
    SILENT_POW,
    Add,
    Augmentation,
    Dropout,
    FrequencyMask,
    Multiply,
    Pitch,
    Tempo,
    TimeMask,
    Volume,
    Warp,
    mel_geometry,
    placed,
    zero_value,
)
from dstrain.augment.spec import ValueRange
from dstrain.features import FeatureConfig

_MASK32 = 0xFFFFFFFF
_SEED_DOMAIN = 0x64657661  # apart from any other stream drawn from the same seed
_GOLDEN = 0x9E3779B9


# ----------------------------------------------------------------------------------------------------------------------
# Counter-based random numbers


# A two-round xorshift-multiply mixer from Chris Wellons' hash prospector ([16 21f0aaad 15 735a2d97 15]): a bijection of
# [0, 2**32) with low avalanche bias whose multipliers are below 2**31, so that a 32-bit word times one stays below
# 2**63 in int64 (TensorFlow has no unsigned 32-bit multiply on every device, and signed overflow is undefined).
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
_SHIFTS = (16, 15, 15)


def _mix_int(x: int) -> int:
    """:func:`_mix` on a Python int: the seed's part of every key is folded in once, at trace time."""
    x &= _MASK32
    for shift, multiplier in zip(_SHIFTS, _MULTIPLIERS):
        x = ((x ^ (x >> shift)) * multiplier) & _MASK32
    return x ^ (x >> _SHIFTS[-1])


def _c(v: int) -> tf.Tensor:
    return tf.constant(v, tf.int64)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """The mixer on int64 tensors of 32-bit words."""
    for shift, multiplier in zip(_SHIFTS, _MULTIPLIERS):
        x = tf.bitwise.bitwise_and(
            tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _c(shift))) * _c(multiplier), _c(_MASK32)
        )
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _c(_SHIFTS[-1])))


def _absorb(h: tf.Tensor, word: Union[tf.Tensor, int]) -> tf.Tensor:
    """``h`` with a 32-bit ``word`` (a non-negative int64 below 2**32, or a Python int) mixed in."""
    return _mix(tf.bitwise.bitwise_xor(h, _c(word & _MASK32) if isinstance(word, int) else word))


def sample_keys(seed: int, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Two independent 32-bit words per sample (int64 ``[B]``) from (seed, epoch, sample id): ``keys`` ``[B, 2]``."""
    s = _mix_int(_mix_int((seed & _MASK32) ^ _SEED_DOMAIN) ^ ((seed >> 32) & _MASK32))
    keys = tf.cast(keys, tf.int64)
    low = tf.bitwise.bitwise_and(keys, _c(_MASK32))
    high = tf.bitwise.bitwise_and(tf.bitwise.right_shift(keys, _c(32)), _c(_MASK32))
    k1 = _absorb(_absorb(_absorb(tf.fill(tf.shape(keys)[:1], _c(s)), low[:, 0]), low[:, 1]), high[:, 1])
    # The second word keys the last round of every draw: two samples whose first words happen to differ only in the
    # bits a draw's index flips would otherwise get the same numbers, shifted.
    return k1, _absorb(k1, _GOLDEN)


def _uniform(bits: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Uniforms in [0, 1) from 32 random bits: all 32 in float64, the top 24 in float32 (exact there)."""
    if dtype == tf.float64:
        return tf.cast(bits, tf.float64) * (1.0 / 2**32)
    return tf.cast(tf.bitwise.right_shift(bits, _c(8)), tf.float32) * (1.0 / 2**24)


class _Draws:
    """The random numbers of a batch: all ops' per-sample draws hashed in one pass (few, large kernels rather than
    many small ones), each op reading its own consecutive ones with :meth:`take`; :meth:`elements` draws one or
    more per value of a tensor."""

    def __init__(self, k1: tf.Tensor, k2: tf.Tensor, total: int):
        self.k1, self.k2, self.used, self.stream = k1, k2, 0, 0
        index = tf.range(total, dtype=tf.int64)[None, :]
        self.u = _uniform(_absorb(_absorb(k1[:, None], index), k2[:, None]), tf.float64)  # [B, total]

    def start(self, stream: int) -> "_Draws":
        """The next op's draws: ``stream`` tells its element-wise draws apart from other ops'."""
        self.stream = stream
        return self

    def take(self, n: int) -> tf.Tensor:
        """``[B, n]`` float64 uniforms in [0, 1): the op's next n draws of each sample."""
        self.used += n
        return self.u[:, self.used - n : self.used]

    def elements(self, shape: tf.Tensor, per_value: int) -> list[tf.Tensor]:
        """``per_value`` float32 uniform tensors of ``shape`` ``[B, T, F]``: value (t, f) of sample b draws from its
        position t * F + f, so its numbers do not depend on the padded length T."""
        n_mel = tf.cast(shape[2], tf.int64)
        position = tf.range(tf.cast(shape[1], tf.int64))[:, None] * n_mel + tf.range(n_mel)[None, :]
        h, k2 = _absorb(self.k1, _mix_int(self.stream + 1))[:, None, None], self.k2[:, None, None]
        return [_uniform(_absorb(_absorb(h, position[None] * per_value + i), k2), tf.float32) for i in range(per_value)]


def _normal(u1: tf.Tensor, u2: tf.Tensor) -> tf.Tensor:
    """Standard normal values from two uniforms in [0, 1) (Box-Muller; 1 - u1 is never 0)."""
    return tf.sqrt(-2.0 * tf.math.log(1.0 - u1)) * tf.cos((2.0 * math.pi) * u2)


def _pick(r: ValueRange, clock: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """:meth:`ValueRange.pick` for every draw of ``u`` ``[B, n]`` (float64, rounded half to even when integer)."""
    center = r.start + clock[:, None] * (r.end - r.start)
    value = (center - r.r) + (2.0 * r.r) * u if r.r else center + tf.zeros_like(u)
    return tf.round(value) if r.integer else value


# ----------------------------------------------------------------------------------------------------------------------
# The batch being augmented


class _Work:
    """A padded batch held as log mel or as mel power (converted only when an op needs it, as the loader's)."""

    def __init__(self, x: tf.Tensor, lengths: tf.Tensor):
        self.x, self.lengths, self.power = x, lengths, False

    def log(self) -> tf.Tensor:
        if self.power:
            self.x = 0.5 * tf.math.log(tf.maximum(self.x, FLOOR_POW))
            self.power = False
        return self.x

    def pow(self) -> tf.Tensor:
        if not self.power:
            self.x = tf.exp(2.0 * self.x)
            self.power = True
        return self.x

    def zero(self, domain: str) -> float:
        return zero_value(domain, self.power)

    def valid(self) -> tf.Tensor:
        """``[B, T]``: the frames that are the utterance, not padding."""
        return tf.sequence_mask(self.lengths, tf.shape(self.x)[1])

    def update(self, applied: tf.Tensor, new: tf.Tensor) -> None:
        self.x = tf.where(applied[:, None, None], new, self.x)


@dataclass
class _Ctx:
    clock: tf.Tensor
    """[B] float64, training progress 0..1."""
    min_frames: tf.Tensor
    """[B] int32, the frames CTC needs for each transcript."""
    frames_per_ms: float
    features: FeatureConfig


def ctc_min_frames(labels: tf.Tensor, label_lengths: tf.Tensor) -> tf.Tensor:
    """:func:`dstrain.alphabet.ctc_min_frames` of each padded row: labels plus repeated neighbours, ``[B]`` int32."""
    labels, label_lengths = tf.cast(labels, tf.int32), tf.cast(label_lengths, tf.int32)
    inside = tf.range(1, tf.shape(labels)[1])[None, :] < label_lengths[:, None]
    repeats = tf.logical_and(tf.equal(labels[:, 1:], labels[:, :-1]), inside)
    return label_lengths + tf.reduce_sum(tf.cast(repeats, tf.int32), axis=1)


def _fill(w: _Work, domain: str, fill: str) -> Union[float, tf.Tensor]:
    if fill == "zero":
        return w.zero(domain)
    x = w.log()  # per-channel mean log mel over the utterance's own frames
    total = tf.reduce_sum(tf.where(w.valid()[:, :, None], x, 0.0), axis=1, keepdims=True)
    return total / tf.cast(tf.maximum(w.lengths, 1), tf.float32)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------------
# Operations: each (op, batch, draws, context, applied [B] bool) -> None; the numpy reference's semantics, per sample


def _mask_draws(op, d: _Draws, c: _Ctx) -> tuple[int, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(most masks, masks per sample, size draws, start draws): drawn the same way for both mask ops."""
    k = max(0, op.n.bounds()[1])
    n = _pick(op.n, c.clock, d.take(1))
    return k, n, d.take(k), d.take(k)


def _frequency_mask(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    k, n, size_u, start_u = _mask_draws(op, d, c)
    if k == 0:
        return
    n_mel = c.features.n_mel
    size = tf.clip_by_value(_pick(op.size, c.clock, size_u), 1.0, float(max(1, n_mel - 1)))
    f0 = tf.floor(start_u * tf.maximum(n_mel - size, 1.0))  # as numpy's integers(0, n_mel - size)
    active = tf.range(k, dtype=tf.float64)[None, :] < n
    channel = tf.range(n_mel, dtype=tf.float64)[None, None, :]
    inside = (channel >= f0[..., None]) & (channel < (f0 + size)[..., None]) & active[..., None]
    masked = tf.reduce_any(inside, axis=1)  # [B, n_mel]
    value = _fill(w, "spectrogram", op.fill)
    w.update(applied, tf.where(masked[:, None, :], value, w.x))


def _time_mask(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    k, n, size_u, start_u = _mask_draws(op, d, c)
    if k == 0:
        return
    frames = tf.cast(w.lengths, tf.float64)[:, None]
    # DeepSpeech truncates ms * frames/ms to whole frames, then keeps at least one frame unmasked.
    size = tf.floor(_pick(op.size, c.clock, size_u) * c.frames_per_ms)
    size = tf.minimum(tf.maximum(size, 1.0), tf.maximum(frames - 1.0, 1.0))
    t0 = tf.floor(start_u * tf.maximum(frames - size, 1.0))
    end = tf.minimum(t0 + size, frames)
    active = tf.range(k, dtype=tf.float64)[None, :] < n
    t = tf.range(tf.shape(w.x)[1], dtype=tf.float64)[None, None, :]
    masked = tf.reduce_any((t >= t0[..., None]) & (t < end[..., None]) & active[..., None], axis=1)  # [B, T]
    value = _fill(w, op.domain, op.fill)
    w.update(applied, tf.where(masked[:, :, None], value, w.x))


def _dropout(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    rate = tf.cast(tf.clip_by_value(_pick(op.rate, c.clock, d.take(1)), 0.0, 1.0), tf.float32)[:, :, None]
    (u,) = d.elements(tf.shape(w.x), 1)
    w.update(applied, tf.where(u < rate, w.zero(op.domain), w.x))


def _gaussian(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    stddev = tf.cast(_pick(op.stddev, c.clock, d.take(1)), tf.float32)[:, :, None]
    x = w.pow() if op.domain == "spectrogram" else w.log()
    g = _normal(*d.elements(tf.shape(x), 2)) * stddev
    new = x + g if isinstance(op, Add) else x * (1.0 + g)
    if w.power:  # negative power is silence (TensorFlow's Mfcc would take sqrt of it: NaN)
        new = tf.maximum(new, 0.0)
    w.update(applied, new)


def _pitch(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    factor = _pick(op.pitch, c.clock, d.take(1))  # [B, 1]
    centres, mel_low, spacing = mel_geometry(c.features)
    n_mel = c.features.n_mel
    pos = (1127.0 * tf.math.log1p(tf.constant(centres)[None, :] / factor / 700.0) - mel_low) / spacing - 1.0
    pos = tf.clip_by_value(pos, 0.0, float(n_mel))  # below channel 0: hold it; index n_mel is the silent top edge
    i0 = tf.minimum(tf.cast(pos, tf.int32), n_mel - 1)
    frac = tf.cast(pos - tf.cast(i0, tf.float64), tf.float32)[:, None, :]
    x = w.pow()
    padded = tf.concat([x, tf.zeros_like(x[:, :, :1])], axis=2)
    low = tf.gather(padded, i0, axis=2, batch_dims=1)
    high = tf.gather(padded, i0 + 1, axis=2, batch_dims=1)
    w.update(applied, low * (1.0 - frac) + high * frac)


def _rows(active: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(the active samples' indices [A], each sample's row among them, A for the others): ops that only some samples
    draw (``p`` < 1) compute on those alone."""
    rows = tf.cast(tf.where(active)[:, 0], tf.int32)
    return rows, tf.where(active, tf.cumsum(tf.cast(active, tf.int32)) - 1, tf.size(rows))


def _merge(active: tf.Tensor, where_rows: tf.Tensor, new: tf.Tensor, old: tf.Tensor) -> tf.Tensor:
    """``old`` with the active samples' rows replaced by ``new``'s (a gather, no scatter: deterministic anywhere)."""
    padded = tf.concat([new, tf.zeros_like(old[:1])], axis=0)
    return tf.where(active[:, None, None], tf.gather(padded, where_rows), old)


def _tempo(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    factor = _pick(op.factor, c.clock, d.take(1))[:, 0]
    frames = tf.cast(w.lengths, tf.float64)
    new = tf.floor(frames / factor)
    if op.max_time > 0:
        new = tf.minimum(new, float(int(op.max_time * c.frames_per_ms)))
    new = tf.maximum(tf.maximum(new, tf.cast(c.min_frames, tf.float64)), 1.0)
    changed = applied & tf.not_equal(new, frames)
    lengths = tf.where(changed, tf.cast(new, tf.int32), w.lengths)
    n_out = tf.maximum(tf.reduce_max(tf.concat([lengths, [0]], 0)), 1)  # an empty batch has no longest
    x = w.pow()
    t_in, n_mel = tf.shape(x)[1], c.features.n_mel
    kept = tf.pad(x[:, :n_out], [[0, 0], [0, tf.maximum(n_out - t_in, 0)], [0, 0]])  # unchanged samples, to T'
    rows, where_rows = _rows(changed)
    # Source frame of each output frame, as the reference's (float64): dst * T / T'.
    old, new = tf.gather(frames, rows), tf.gather(new, rows)
    src = tf.range(n_out, dtype=tf.float64)[None, :] * (old / new)[:, None]
    last = tf.maximum(tf.cast(old, tf.int32) - 1, 0)[:, None]
    i0 = tf.minimum(tf.cast(src, tf.int32), last)
    i1 = tf.minimum(i0 + 1, last)
    frac = tf.cast(src - tf.cast(i0, tf.float64), tf.float32)[:, :, None]
    flat = tf.reshape(x, [-1, n_mel])  # frames of all samples: one gather of whole frames per tap
    first = (rows * t_in)[:, None]
    stretched = tf.gather(flat, first + i0) * (1.0 - frac) + tf.gather(flat, first + i1) * frac
    w.x = _merge(changed, where_rows, stretched, kept)
    w.lengths = lengths


def _cubic_taps(n_in: tf.Tensor, n_out: tf.Tensor, positions: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """For output ``positions`` ``[P]`` of each sample, the 4 (index ``[B, P]`` int32, weight float32) taps of
    cubic-convolution upsampling from ``n_in`` to ``n_out`` points (``[B]`` float64), corners aligned: what
    the tests' numpy reference holds as a matrix (Keys, a = -0.75, as TensorFlow's bicubic)."""
    ratio = tf.where(n_out > 1, (n_in - 1.0) / tf.maximum(n_out - 1.0, 1.0), 0.0)
    src = positions[None, :] * ratio[:, None]
    base = tf.floor(src)
    t = src - base
    top = tf.maximum(n_in - 1.0, 0.0)[:, None]
    a = -0.75
    taps = []
    for k in (-1, 0, 1, 2):
        dist = tf.abs(t - k)
        near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
        far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
        weight = tf.where(dist <= 1, near, tf.where(dist < 2, far, 0.0))
        taps.append((tf.cast(tf.clip_by_value(base + k, 0.0, top), tf.int32), tf.cast(weight, tf.float32)))
    return taps


def _upsampling(n_in: tf.Tensor, n_out: tf.Tensor, positions: tf.Tensor, depth: int) -> tf.Tensor:
    """The taps of :func:`_cubic_taps` as weights ``[B, P, depth]`` (grid points past a sample's ``n_in`` weigh 0)."""
    return tf.add_n(
        [
            tf.one_hot(index, depth, dtype=tf.float32) * weight[:, :, None]
            for index, weight in _cubic_taps(n_in, n_out, positions)
        ]
    )


def _warp(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    nt_max, nf_max = max(0, op.nt.bounds()[1]), max(0, op.nf.bounds()[1])
    u = d.take(4)
    normal_u = d.take(4 * nt_max * nf_max)
    warps_time, warps_freq = op.wt.bounds() != (0, 0), op.wf.bounds() != (0, 0)
    if nt_max == 0 or nf_max == 0 or not (warps_time or warps_freq):
        return
    nt, nf = _pick(op.nt, c.clock, u[:, 0:1])[:, 0], _pick(op.nf, c.clock, u[:, 1:2])[:, 0]
    wt, wf = _pick(op.wt, c.clock, u[:, 2:3])[:, 0], _pick(op.wf, c.clock, u[:, 3:4])[:, 0]
    active = applied & (nt > 0) & (nf > 0) & (tf.not_equal(wt, 0.0) | tf.not_equal(wf, 0.0))
    rows, where_rows = _rows(active)
    nt, nf, wt, wf, normal_u = (tf.gather(v, rows) for v in (nt, nf, wt, wf, normal_u))
    lengths = tf.gather(w.lengths, rows)
    frames = tf.cast(lengths, tf.float64)
    n_mel = c.features.n_mel
    # wt = 1 is a standard deviation of half the distance between grid lines, as in DeepSpeech.
    scale = tf.stack([wt * frames / (2 * (nt + 1)), wf * n_mel / (2 * (nf + 1))], axis=1)  # [A, 2]
    half = 2 * nt_max * nf_max
    z = tf.reshape(_normal(normal_u[:, :half], normal_u[:, half:]), [-1, 2, nt_max, nf_max]) * scale[:, :, None, None]
    interior = (tf.range(nt_max, dtype=tf.float64)[None, :, None] < nt[:, None, None]) & (
        tf.range(nf_max, dtype=tf.float64)[None, None, :] < nf[:, None, None]
    )
    grid = tf.where(interior[:, None], z, 0.0)
    grid = tf.cast(tf.pad(grid, [[0, 0], [0, 0], [1, 1], [1, 1]]), tf.float32)  # [A, 2, Gt, Gf], zero at the edges
    # Dense flow: the grid upsampled along frequency (per sample, small), then along time. Sums of products in a
    # fixed order rather than matrix products, whose rounding could change with the padded length.
    t_pad = tf.shape(w.x)[1]
    along_f = _upsampling(
        nf + 2, tf.zeros_like(nf) + n_mel, tf.range(n_mel, dtype=tf.float64), nf_max + 2
    )  # [A, F, Gf]
    along_t = _upsampling(nt + 2, frames, tf.range(t_pad, dtype=tf.float64), nt_max + 2)  # [A, T, Gt]
    coarse = tf.add_n(
        [grid[:, :, :, j, None] * along_f[:, None, None, :, j] for j in range(nf_max + 2)]
    )  # [A, 2, Gt, F]

    def flow(axis: int) -> tf.Tensor:  # [A, T, F]
        return tf.add_n([along_t[:, :, i, None] * coarse[:, axis, None, i, :] for i in range(nt_max + 2)])

    x = tf.gather(w.pow(), rows)
    qt = tf.range(t_pad, dtype=tf.float32)[None, :, None] - flow(0) if warps_time else None
    qf = tf.range(n_mel, dtype=tf.float32)[None, None, :] - flow(1) if warps_freq else None
    w.x = _merge(active, where_rows, _bilinear(x, qt, qf, lengths), w.x)


def _bilinear(x: tf.Tensor, qt: Optional[tf.Tensor], qf: Optional[tf.Tensor], lengths: tf.Tensor) -> tf.Tensor:
    """Each sample of ``x`` ``[B, T, F]`` at fractional ``(qt, qf)`` (None: the frame's or channel's own position),
    clamped to its own frames and the channels (as tfa's dense_image_warp)."""
    n_mel = x.shape[2]
    t_pad = tf.shape(x)[1]

    def corners(q: tf.Tensor, n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        q = tf.minimum(tf.maximum(q, 0.0), n - 1.0)
        i0 = tf.minimum(tf.floor(q), tf.maximum(n - 2.0, 0.0))
        return tf.cast(i0, tf.int32), tf.cast(tf.minimum(i0 + 1.0, n - 1.0), tf.int32), q - i0

    flat = tf.reshape(x, [-1])
    frame0 = tf.range(tf.shape(x)[0])[:, None, None] * t_pad
    channel = tf.range(n_mel)[None, None, :]
    if qt is None:
        rows = [(frame0 + tf.range(t_pad)[None, :, None]) * n_mel, None]
        at = None
    else:
        t0, t1, at = corners(qt, tf.cast(lengths, tf.float32)[:, None, None])
        rows = [(frame0 + t0) * n_mel, (frame0 + t1) * n_mel]

    if qf is not None:
        f0, f1, af = corners(qf, tf.constant(float(n_mel)))

    def along_f(row: tf.Tensor) -> tf.Tensor:
        if qf is None:
            return tf.gather(flat, row + channel)
        return tf.gather(flat, row + f0) * (1.0 - af) + tf.gather(flat, row + f1) * af

    top = along_f(rows[0])
    return top if at is None else top * (1.0 - at) + along_f(rows[1]) * at


def _volume(op, w: _Work, d: _Draws, c: _Ctx, applied: tf.Tensor) -> None:
    gain_db = tf.cast(_pick(op.gain, c.clock, d.take(1)), tf.float32)[:, :, None]
    x = w.x
    if w.power:
        new = tf.where(x > SILENT_POW, x * tf.pow(10.0, gain_db / 10.0), x)
    else:  # log(E) + log(10**(gain/20)): silent (floored) values stay silent
        new = tf.maximum(tf.where(x > SILENT_LOG, x + gain_db * (math.log(10.0) / 20.0), x), FLOOR_LOG)
    w.update(applied, new)


_OPS: dict[type[Augmentation], Callable[..., None]] = {
    FrequencyMask: _frequency_mask,
    TimeMask: _time_mask,
    Dropout: _dropout,
    Add: _gaussian,
    Multiply: _gaussian,
    Pitch: _pitch,
    Tempo: _tempo,
    Warp: _warp,
    Volume: _volume,
}
"""The implementation of each op class whose ``RUNS`` names the device (a test checks that they are the same)."""


class DeviceAugmenter:
    """Applies parsed augmentations to padded batches, as TensorFlow ops (call it inside a ``tf.function``).

    ``seed`` and ``epochs`` are training's: an epoch's clock (``values a:b`` move along it) is epoch / (epochs - 1), as
    on the loader.
    """

    def __init__(
        self,
        augmentations: Sequence[Augmentation],
        seed: int,
        epochs: int,
        features: Optional[FeatureConfig] = None,
        step_ms: Optional[float] = None,
    ):
        self.augmentations, self.features, self.step_ms = placed(
            augmentations, _OPS, "device", "loader", features, step_ms
        )
        self.seed, self.epochs = int(seed), int(epochs)

    def __len__(self) -> int:
        return len(self.augmentations)

    def __call__(
        self, x: tf.Tensor, lengths: tf.Tensor, labels: tf.Tensor, label_lengths: tf.Tensor, keys: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(augmented log mel ``[B, T', n_mel]`` float32, zero beyond each length; lengths ``[B]`` int32). ``x`` is a
        padded batch of any float dtype, ``labels``/``label_lengths`` bound how short tempo may make an utterance
        (what CTC needs), ``keys`` ``[B, 2]`` holds each sample's (epoch, sample id)."""
        n_mel = self.features.n_mel
        x = tf.convert_to_tensor(x)
        if x.shape.rank != 3 or (x.shape[2] is not None and x.shape[2] != n_mel):
            raise ValueError(f"expected log mel [batch, frames, {n_mel}], got shape {x.shape}")
        keys = tf.cast(keys, tf.int64)
        k1, k2 = sample_keys(self.seed, keys)
        clock = tf.clip_by_value(tf.cast(keys[:, 0], tf.float64) / max(1, self.epochs - 1), 0.0, 1.0)
        ctx = _Ctx(clock, ctc_min_frames(labels, label_lengths), 1.0 / self.step_ms, self.features)
        w = _Work(tf.ensure_shape(tf.cast(x, tf.float32), [None, None, n_mel]), tf.cast(lengths, tf.int32))
        draws = _Draws(k1, k2, sum(aug.draws() for aug in self.augmentations))
        for stream, aug in enumerate(self.augmentations):
            before = draws.start(stream).used
            applied = draws.take(1)[:, 0] < aug.p  # p=0 never (draws >= 0), p=1 always (draws < 1)
            _OPS[type(aug)](aug, w, draws, ctx, applied)
            if draws.used - before != aug.draws():  # an op's draws would shift every later op's
                raise AssertionError(f"{aug.name} took {draws.used - before} draws, its draws() says {aug.draws()}")
        out = w.log()
        return tf.where(w.valid()[:, :, None], out, 0.0), w.lengths
