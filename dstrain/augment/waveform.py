"""Waveform augmentation at preprocessing: extra, labelled copies of every utterance, made where the audio is.

The feature store keeps filterbanks, so training's augmentation (:mod:`dstrain.augment.filterbank`) cannot do what needs
the waveform. ``dstrain preprocess --augment SPEC ... --augment_copies K`` stores, next to each utterance, K copies made
by these ops, in DeepSpeech 0.9's syntax (``NAME[p=...,key=value,...]``, values ``v``, ``a:b``, ``v~r``,
``a:b~r`` parsed by :func:`dstrain.augment.spec.parse_spec`):

* ``reverb[delay=20.0,decay=10.0]``: DeepSpeech's simplified Schroeder reverb: five feedback comb filters with
  delays ``delay`` ms x 17/17 ... 31/17 (primes, against comb interference), ``decay`` dB lost per reflection,
  summed with the dry signal and levelled back to its peak. Unlike DeepSpeech (which cut the result to the input's
  length) the reverberation tail is kept until it has decayed by 60 dB, so the copy is longer.
* ``resample[rate=8000]``: down to ``rate`` Hz and back (soxr, HQ), the length kept: removes everything above
  ``rate``/2, as telephone audio lacks it.
* ``codec[bitrate=3200,format=opus]``: a lossy round trip through libsndfile: ``opus`` (Ogg Opus, as DeepSpeech) or
  ``mp3`` (LAME, constant bitrate). ``bitrate`` in bit/s is clipped to what the codec offers through libsndfile
  (Opus 6-256 kbit/s; MP3 at 16 kHz 8-160 kbit/s, its nearest standard rate), so DeepSpeech's default 3200 means
  the lowest rate. MP3's encoder delay is removed (by cross-correlation when the file has no gapless header).
* ``speed[factor=1~0.1]``: speed perturbation (Ko et al. 2015, Kaldi's and NeMo's): the audio played ``factor``
  times faster by resampling, so duration / factor and every frequency x factor. (``tempo`` and ``pitch`` act on
  the filterbank at training time.)
* ``overlay[source=NOISE,snr=3.0,layers=1]``: noise from ``source`` (a folder, searched recursively for
  wav/flac/mp3/ogg/opus files, or a DeepSpeech CSV) at ``snr`` dB below the utterance: ``layers`` noise signals,
  each stitched from random files starting at a random offset, summed, and scaled so that the utterance's mean
  power over the noise's is ``snr`` dB (DeepSpeech compared peak levels; this is the SNR one measures). The mix is
  scaled down only if it would clip.
* ``volume[dbfs=3.0103]``: DeepSpeech's volume: levels the peak to ``dbfs`` (its convention: 3.0103 puts the peak
  at full scale), clipped to [-1, 1].

Each copy applies the ops in command-line order, each with its probability ``p`` (so a copy can come out unchanged;
the manifest counts those). ``a:b`` ranges go from ``a`` on the first copy to ``b`` on the last (DeepSpeech's
training clock becomes the copy number), so ``speed[factor=0.9:1.1]`` with ``--augment_copies 2`` gives Kaldi's
0.9/1.1 pair. Every random draw comes from a generator seeded by (``--augment_seed``, the row's position in the
input, the copy number) alone: the same command makes the same copies on any number of workers or ranks.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import fsspec
import numpy as np
import soundfile
import soxr

from dstrain.audio import AudioError, read_audio
from dstrain.augment.filterbank import FILTERBANK_OPS
from dstrain.augment.spec import PREPROCESSING, ParsedOp, ValueRange, parse_spec
from dstrain.config import option
from dstrain.prep.csvfile import read_csv_rows

NOISE_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")
_SEED_DOMAIN = 0x70726570  # keeps these streams apart from the training loader's (seed, epoch, sample) ones
_NOISE_CACHE = 16  # decoded noise files kept per process


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Waveform augmentation into stored copies"""

    augment: tuple[str, ...] = option((), append=True)
    """Waveform augmentation, DeepSpeech 0.9's syntax, repeatable: reverb, resample, codec, speed, overlay (noise
    from a folder or CSV of audio), volume, e.g. --augment 'speed[factor=0.9:1.1]' --augment
    'overlay[p=0.5,source=noise/,snr=10~5]'. Needs --augment_copies."""
    augment_copies: int = 0
    """Augmented copies stored per utterance, beside it (ids ID-aug1..ID-augK, in shards of their own); 0 means
    none."""
    augment_seed: int = 4568
    """Seed of the augmentation's random draws, with each row's position and the copy number."""

    def __post_init__(self) -> None:
        if self.augment_copies < 0:
            raise ValueError(f"augment_copies must be >= 0, got {self.augment_copies}")
        if self.augment and not self.augment_copies:
            raise ValueError("--augment at preprocessing makes copies: give --augment_copies K (K >= 1)")
        if self.augment_copies and not self.augment:
            raise ValueError(f"--augment_copies {self.augment_copies} needs at least one --augment op")
        parse_ops(self.augment)  # a bad spec fails here, before any work


# --------------------------------------------------------------------------------------------------------------------
# Ops


@dataclass
class _Ctx:
    rng: np.random.Generator
    clock: float
    sample_rate: int


class WaveOp(ParsedOp):
    """One parsed waveform op; ``apply`` returns a new float32 signal (the input is not modified)."""

    RUNS = (PREPROCESSING,)

    def check_rate(self, sample_rate: int) -> None:
        """Rejects a sample rate this op cannot handle, before any work."""

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        raise NotImplementedError


def _positive(name: str, r: ValueRange) -> None:
    if r.bounds()[0] <= 0:
        raise ValueError(f"{name}={r} can reach {r.bounds()[0]}; it must stay > 0")


def _peak(x: np.ndarray) -> float:
    return float(np.max(np.abs(x))) if x.size else 0.0


class Reverb(WaveOp):
    name = "reverb"
    PARAMS = {"delay": ("float", "20.0"), "decay": ("float", "10.0")}
    PRIMES = (17, 19, 23, 29, 31)
    TAIL_DB = 60.0

    def validate(self) -> None:
        _positive("delay", self.delay)
        _positive("decay", self.decay)

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        delay_ms, decay_db = self.delay.pick(ctx.rng, ctx.clock), self.decay.pick(ctx.rng, ctx.clock)
        gain = 10.0 ** (-decay_db / 20.0)
        # 16 samples at least, as DeepSpeech: the block recursion below costs one step per delay
        delays = [max(16, int(delay_ms * p / self.PRIMES[0] * ctx.sample_rate / 1000.0)) for p in self.PRIMES]
        tail = max(delays) * math.ceil(self.TAIL_DB / decay_db)
        dry = np.zeros(x.size + tail)
        dry[: x.size] = x
        out = dry.copy()
        for d in delays:
            out += _feedback_comb(dry, d, gain)
        peak = _peak(out)
        if peak > 0:
            out *= _peak(x) / peak
        return out.astype(np.float32)


def _feedback_comb(x: np.ndarray, delay: int, gain: float) -> np.ndarray:
    """``y[n] = x[n] + gain * y[n - delay]``, one block of ``delay`` samples at a time (each block depends only on
    the one before, so a block is one vector operation)."""
    y = x.copy()
    for start in range(delay, y.size, delay):
        stop = min(start + delay, y.size)
        y[start:stop] += gain * y[start - delay : stop - delay]
    return y


class Resample(WaveOp):
    name = "resample"
    PARAMS = {"rate": ("int", "8000")}

    def validate(self) -> None:
        _positive("rate", self.rate)

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        rate = self.rate.pick(ctx.rng, ctx.clock)
        if rate == ctx.sample_rate:
            return x.copy()
        there = soxr.resample(x, ctx.sample_rate, rate, quality="HQ")
        back = soxr.resample(there, rate, ctx.sample_rate, quality="HQ")
        return _fit(back, x.size)


class Codec(WaveOp):
    name = "codec"
    PARAMS = {"bitrate": ("int", "3200"), "format": ("format", "opus")}
    # Through libsndfile, Opus (Ogg) takes these rates; MP3 (LAME) the MPEG-1/2/2.5 rates.
    RATES = {
        "opus": (8000, 12000, 16000, 24000, 48000),
        "mp3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    }

    def validate(self) -> None:
        _positive("bitrate", self.bitrate)

    def check_rate(self, sample_rate: int) -> None:
        if sample_rate not in self.RATES[self.format]:
            raise ValueError(
                f"augmentation {self.spec!r}: {self.format} cannot encode {sample_rate} Hz audio "
                f"(rates: {', '.join(map(str, self.RATES[self.format]))})"
            )

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        bitrate = self.bitrate.pick(ctx.rng, ctx.clock)
        buf = io.BytesIO()
        if self.format == "opus":
            # libsndfile: bitrate = 6 kbit/s + (1 - level) x 250 kbit/s
            level = 1.0 - (bitrate - 6000) / 250000
            soundfile.write(buf, x, ctx.sample_rate, format="OGG", subtype="OPUS", compression_level=_clip_level(level))
        else:
            # libsndfile: MPEG-1 (32-48 kHz) 320 - level x 288 kbit/s, MPEG-2/2.5 160 - level x 152; level 1.0 fails
            top, span = (320, 288) if ctx.sample_rate >= 32000 else (160, 152)
            level = min(_clip_level((top - bitrate / 1000) / span), 0.999)
            soundfile.write(
                buf,
                x,
                ctx.sample_rate,
                format="MP3",
                subtype="MPEG_LAYER_III",
                compression_level=level,
                bitrate_mode="CONSTANT",
            )
        buf.seek(0)
        y, _ = soundfile.read(buf, dtype="float32")
        return _align(y, x)


def _clip_level(level: float) -> float:
    return float(min(1.0, max(0.0, level)))


def _format(raw: str) -> str:
    if raw not in Codec.RATES:
        raise ValueError(f"unknown format {raw!r} (use {' or '.join(Codec.RATES)})")
    return raw


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[: min(n, y.size)] = y[:n]
    return out


def _align(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y`` (decoded, possibly delayed and padded) cut to ``x``'s length where it matches ``x`` best."""
    extra = y.size - x.size
    if extra <= 0:
        return _fit(y, x.size)
    n = 1 << (y.size + x.size).bit_length()
    corr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(x, n)), n)[: extra + 1]  # corr[k] = sum y[i+k] x[i]
    lag = int(np.argmax(corr))
    return np.ascontiguousarray(y[lag : lag + x.size], dtype=np.float32)


class Speed(WaveOp):
    name = "speed"
    PARAMS = {"factor": ("float", "1~0.1")}

    def validate(self) -> None:
        _positive("factor", self.factor)

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        factor = self.factor.pick(ctx.rng, ctx.clock)
        if factor == 1.0:
            return x.copy()
        # The samples read as if recorded at rate x factor, then brought back to the rate: n / factor samples.
        return soxr.resample(x, ctx.sample_rate * factor, ctx.sample_rate, quality="HQ").astype(np.float32)


class Overlay(WaveOp):
    name = "overlay"
    PARAMS = {"source": ("str", None), "snr": ("float", "3.0"), "layers": ("int", "1")}
    corpus: "NoiseCorpus | None" = None  # set by :func:`parse_ops` when it opens the sources

    def validate(self) -> None:
        if not self.source:
            raise ValueError("overlay needs source=FOLDER or source=FILE.csv of noise audio")

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        layers = self.layers.pick(ctx.rng, ctx.clock)
        snr_db = self.snr.pick(ctx.rng, ctx.clock)
        if layers <= 0 or x.size == 0:
            return x.copy()
        noise = np.zeros(x.size)
        for _ in range(layers):
            noise += self.corpus.draw(ctx.rng, x.size, ctx.sample_rate)
        speech_power, noise_power = float(np.mean(np.square(x, dtype=np.float64))), float(np.mean(noise * noise))
        if speech_power <= 0 or noise_power <= 0:
            return x.copy()
        out = x + noise * math.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
        peak = _peak(out)
        if peak > 1.0:
            out /= peak  # no clipping: scaling both keeps the SNR
        return out.astype(np.float32)


class Volume(WaveOp):
    name = "volume"
    PARAMS = {"dbfs": ("float", "3.0103")}

    def apply(self, x: np.ndarray, ctx: _Ctx) -> np.ndarray:
        dbfs = self.dbfs.pick(ctx.rng, ctx.clock)
        peak = _peak(x)
        if peak <= 0:
            return x.copy()
        # DeepSpeech's dBFS of a peak is 20 log10(peak) + 3.0103 (a full-scale sine's RMS convention)
        return np.clip(x * (10.0 ** ((dbfs - 3.0103) / 20.0) / peak), -1.0, 1.0).astype(np.float32)


OPS: dict[str, type[WaveOp]] = {cls.name: cls for cls in (Reverb, Resample, Codec, Speed, Overlay, Volume)}
"""Preprocessing's ``--augment`` ops by name (``overlay`` and ``volume`` are other ops than training's)."""


# --------------------------------------------------------------------------------------------------------------------
# Noise


class NoiseCorpus:
    """The audio files of a folder (recursively) or a DeepSpeech CSV, listed once, decoded on use (a few cached per
    process)."""

    def __init__(self, source: str, files: Sequence[str]):
        self.source, self.files = source, tuple(files)

    @classmethod
    def open(cls, source: str) -> "NoiseCorpus":
        if source.lower().endswith(".csv"):
            try:
                files = [r.source for r in read_csv_rows([source])]
            except FileNotFoundError:
                raise ValueError(f"overlay source {source}: no such CSV") from None
        else:
            fs, root = fsspec.core.url_to_fs(source)
            if not fs.isdir(root):
                raise ValueError(f"overlay source {source}: not a folder or a .csv of audio files")
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            found = sorted(p for p in fs.find(root) if p.lower().endswith(NOISE_EXTENSIONS))
            files = found if protocol in ("file", "local") else [f"{protocol}://{p}" for p in found]
        if not files:
            raise ValueError(f"overlay source {source}: no audio files ({', '.join(NOISE_EXTENSIONS)})")
        return cls(source, files)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()

    def draw(self, rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
        """``n`` samples: from a random offset of a random file, continued with further random files."""
        parts, have = [], 0
        first = True
        while have < n:
            audio = _noise_audio(self.files[int(rng.integers(len(self.files)))], sample_rate, self.source)
            if first:
                audio, first = audio[int(rng.integers(audio.size)) :], False
            parts.append(audio[: n - have])
            have += parts[-1].size
        return np.concatenate(parts).astype(np.float64)


@functools.lru_cache(maxsize=_NOISE_CACHE)
def _noise_audio(path: str, sample_rate: int, source: str) -> np.ndarray:
    try:
        return read_audio(path, sample_rate)
    except AudioError as e:
        raise ValueError(f"overlay source {source}: {e}") from None


# --------------------------------------------------------------------------------------------------------------------
# Parsing and applying


def _unknown(name: str) -> str:
    if name in FILTERBANK_OPS:
        return (
            f"{name} acts on the filterbank at training time: give it to dstrain train --augment; "
            f"preprocessing augments the waveform ({', '.join(sorted(OPS))})"
        )
    return f"unknown augmentation {name!r} (preprocessing has: {', '.join(sorted(OPS))})"


def parse_ops(specs: Sequence[str], sample_rate: int | None = None, open_noise: bool = False) -> list[WaveOp]:
    """``--augment`` values of ``dstrain preprocess``; ValueError names the spec and what is wrong. ``open_noise``
    lists the overlay sources' files (each source once)."""
    ops, corpora = [], {}
    for spec in specs:
        cls, p, values = parse_spec(spec, OPS, _unknown, {"format": _format})
        op = cls(spec, p, values)
        try:
            op.validate()
        except ValueError as e:
            raise ValueError(f"augmentation {spec!r}: {e}") from None
        if sample_rate is not None:
            op.check_rate(sample_rate)
        if open_noise and isinstance(op, Overlay):
            if op.source not in corpora:
                corpora[op.source] = NoiseCorpus.open(op.source)
            op.corpus = corpora[op.source]
        ops.append(op)
    return ops


class WaveAugmenter:
    """Makes the copies of one utterance. Picklable (process pools): the noise corpora travel as file lists.

    Example::

        aug = WaveAugmenter.build(cfg.augmentation, sample_rate=16000)
        for copy, samples, applied in aug.copies(x, row_index):   # copy 1..K
            ...
    """

    def __init__(self, ops: Sequence[WaveOp], copies: int, seed: int, sample_rate: int):
        self.ops, self.n_copies, self.seed, self.sample_rate = tuple(ops), copies, seed, sample_rate

    @classmethod
    def build(cls, cfg: AugmentConfig, sample_rate: int) -> "WaveAugmenter | None":
        """None when ``cfg`` asks for no copies."""
        if not cfg.augment_copies:
            return None
        return cls(
            parse_ops(cfg.augment, sample_rate, open_noise=True), cfg.augment_copies, cfg.augment_seed, sample_rate
        )

    def rng(self, row_index: int, copy: int) -> np.random.Generator:
        entropy = [int(v) % (1 << 64) for v in (self.seed, row_index, copy)]
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(_SEED_DOMAIN,))))

    def copy(self, samples: np.ndarray, row_index: int, copy: int) -> tuple[np.ndarray, list[str]]:
        """Copy ``copy`` (1..K) of the utterance at input position ``row_index``, and the names of the ops applied."""
        rng = self.rng(row_index, copy)
        ctx = _Ctx(rng, (copy - 1) / (self.n_copies - 1) if self.n_copies > 1 else 0.0, self.sample_rate)
        x, applied = np.asarray(samples, dtype=np.float32), []
        for op in self.ops:
            if rng.random() < op.p:  # p=0 never, p=1 always
                x = op.apply(x, ctx)
                applied.append(op.name)
        return x, applied

    def copies(self, samples: np.ndarray, row_index: int) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        for k in range(1, self.n_copies + 1):
            yield (k, *self.copy(samples, row_index, k))

    def fingerprint(self) -> str:
        """What, besides the flags, decides the copies: the noise corpora's file lists."""
        corpora = {op.source: op.corpus.digest() for op in self.ops if isinstance(op, Overlay) and op.corpus}
        return json.dumps(corpora, sort_keys=True)

    def noise_summary(self) -> dict:
        return {op.source: {"files": len(op.corpus.files)} for op in self.ops if isinstance(op, Overlay) and op.corpus}


def copy_id(utterance_id: str, copy: int) -> str:
    """The id of an augmented copy: the original's with ``-augK``."""
    return f"{utterance_id}-aug{copy}"


REJECT_PREFIX = "augmented_"
"""A copy that did not make it is rejected with the original reasons under this prefix (augmented_too_short...)."""


@dataclass
class AugmentTally:
    """What augmentation did in one chunk (merged over chunks for the manifest)."""

    applied: Counter = field(default_factory=Counter)
    """Copies each op was applied to (``unchanged``: copies to which no op applied)."""
    rejects: Counter = field(default_factory=Counter)
    """Copies rejected, by reason."""

    def count(self, applied: Sequence[str]) -> None:
        self.applied.update(applied or ["unchanged"])

    def to_dict(self) -> dict:
        return {"applied": dict(sorted(self.applied.items())), "rejects": dict(sorted(self.rejects.items()))}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentTally":
        return cls(Counter(d.get("applied", {})), Counter(d.get("rejects", {})))

    def merge(self, other: "AugmentTally") -> "AugmentTally":
        return AugmentTally(self.applied + other.applied, self.rejects + other.rejects)


def manifest_section(cfg: AugmentConfig, augmenter: WaveAugmenter, tally: AugmentTally, copies: int) -> dict:
    """The manifest's ``augmentation``: how copies were made and what came of them."""
    rejects = dict(sorted(tally.rejects.items()))
    return {
        "specs": list(cfg.augment),
        "copies_per_utterance": cfg.augment_copies,
        "seed": cfg.augment_seed,
        "noise": augmenter.noise_summary(),
        "utterances": copies,
        "applied": dict(sorted(tally.applied.items())),
        "rejects": {"count": sum(rejects.values()), "by_reason": rejects},
    }
