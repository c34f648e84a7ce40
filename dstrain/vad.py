"""Splitting long recordings at pauses with WebRTC VAD.

The algorithm follows DeepSpeech's ``vad_split``
(``training/deepspeech_training/util/audio.py``, used by its ``transcribe.py``):
the audio is cut into 10/20/30 ms frames, WebRTC VAD marks each frame voiced or
not, and a ring buffer of the last ``padding_ms`` of frames decides:

* not in a segment: once more than ``threshold`` of the ring buffer is voiced, a
  segment starts at the oldest frame in the buffer (so up to ``padding_ms`` of
  lead-in is kept);
* in a segment: once more than ``threshold`` of the ring buffer is unvoiced, the
  segment ends after the current frame (so the trailing pause is kept).

Unlike DeepSpeech, positions are exact sample offsets (DeepSpeech's returned times
were off by the padding); segments that touch (one starts on the frame after the
other ends: no pause between them, which happens while WebRTC VAD's noise model is
still adapting) are merged; and segments longer than ``max_segment_s`` are cut at
their quietest frame (lowest energy), so whatever consumes the segments needs at
most ``max_segment_s`` of audio at a time.

``webrtcvad`` comes from the ``webrtcvad-wheels`` distribution (maintained wheels
of the original ``webrtcvad`` module).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

SAMPLE_RATES = (8000, 16000, 32000, 48000)
FRAME_MS = (10, 20, 30)


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, end)`` of the audio passed to :func:`split_on_silence`."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def samples(self, audio: np.ndarray) -> np.ndarray:
        """This segment's samples of ``audio`` (a view, not a copy)."""
        return audio[self.start : self.end]

    def seconds(self, sample_rate: int = 16000) -> tuple[float, float]:
        """(start, end) in seconds."""
        return self.start / sample_rate, self.end / sample_rate


def _to_pcm16(samples: np.ndarray) -> np.ndarray:
    if samples.dtype == np.int16:
        return samples
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"VAD expects float samples in [-1, 1] (or int16), got {samples.dtype}")
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


def _voiced_regions(
    pcm: np.ndarray, sample_rate: int, aggressiveness: int, frame_len: int, n_padding: int, threshold: float
) -> list[tuple[int, int]]:
    """DeepSpeech's ring-buffer trigger; returns (first_frame, end_frame) pairs, end exclusive."""
    from webrtcvad import Vad

    vad = Vad(int(aggressiveness))
    n_frames = -(-len(pcm) // frame_len)
    regions: list[tuple[int, int]] = []
    ring: collections.deque[tuple[int, bool]] = collections.deque(maxlen=n_padding)
    triggered = False
    start = 0
    for i in range(n_frames):
        frame = pcm[i * frame_len : (i + 1) * frame_len]
        if len(frame) < frame_len:  # the last, partial frame: judge it padded with silence
            frame = np.concatenate([frame, np.zeros(frame_len - len(frame), np.int16)])
        is_speech = vad.is_speech(frame.tobytes(), sample_rate)
        ring.append((i, is_speech))
        if not triggered:
            if sum(s for _, s in ring) > threshold * n_padding:
                triggered = True
                start = ring[0][0]
                ring.clear()
        elif sum(not s for _, s in ring) > threshold * n_padding:
            triggered = False
            regions.append((start, i + 1))
            ring.clear()
    if triggered:
        regions.append((start, n_frames))
    # A segment that starts right where the previous one ended had no pause between them
    # (the trailing and leading padding met): one stretch of speech, cut only if too long.
    merged: list[tuple[int, int]] = []
    for first, end in regions:
        if merged and merged[-1][1] == first:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((first, end))
    return merged


def _cut_long(
    start: int, end: int, energy: np.ndarray, frame_len: int, max_len: int, min_len: int, n_samples: int
) -> list[Segment]:
    """Cut [start, end) (samples, frame-aligned start) into pieces <= max_len at the quietest frames."""
    pieces = []
    while end - start > max_len:
        # Cut inside the window [start + lo, start + max_len]: at the centre of its quietest frame.
        lo = max(min_len, max_len // 2)
        first = -(-(start + lo - frame_len // 2) // frame_len)  # frames whose centre lies in the window
        last = (start + max_len - frame_len // 2) // frame_len
        if last < first:  # window narrower than a frame: cut at the limit
            cut = start + max_len
        else:
            quietest = first + int(np.argmin(energy[first : last + 1]))
            cut = quietest * frame_len + frame_len // 2
        pieces.append(Segment(start, cut))
        start = cut
    pieces.append(Segment(start, min(end, n_samples)))
    return pieces


def split_on_silence(
    samples: np.ndarray,
    sample_rate: int = 16000,
    aggressiveness: int = 3,
    frame_ms: int = 30,
    padding_ms: int = 300,
    max_segment_s: float = 30.0,
    min_segment_s: float = 0.0,
    threshold: float = 0.5,
) -> list[Segment]:
    """Speech segments of mono ``samples`` (float in [-1, 1], or int16), in order, non-overlapping.

    ``aggressiveness`` (0-3) is WebRTC VAD's mode, 3 filtering out the most non-speech.
    ``padding_ms`` is the ring buffer's length: a segment starts once more than
    ``threshold`` of the last ``padding_ms`` is voiced and ends once more than
    ``threshold`` of it is unvoiced. Segments longer than ``max_segment_s`` are cut
    at their quietest frame (every piece but the last of such a segment is at least
    ``max(min_segment_s, max_segment_s / 2)`` long); VAD segments shorter than ``min_segment_s`` (clicks, noise
    bursts) are dropped, 0 keeps them all. Raises ValueError for a sample rate other than
    8/16/32/48 kHz, a frame length other than 10/20/30 ms, or other bad arguments.
    """
    if sample_rate not in SAMPLE_RATES:
        raise ValueError(f"VAD supports sample rates {SAMPLE_RATES}, got {sample_rate}: resample first")
    if frame_ms not in FRAME_MS:
        raise ValueError(f"VAD frame length must be one of {FRAME_MS} ms, got {frame_ms}")
    if aggressiveness not in (0, 1, 2, 3):
        raise ValueError(f"VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness}")
    if padding_ms < frame_ms:
        raise ValueError(f"padding_ms ({padding_ms}) must be at least one frame ({frame_ms} ms)")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if max_segment_s * 1000 < 2 * frame_ms:
        raise ValueError(f"max_segment_s ({max_segment_s}) must be at least two frames")
    if not 0.0 <= min_segment_s < max_segment_s:
        raise ValueError(f"min_segment_s ({min_segment_s}) must be in [0, max_segment_s={max_segment_s})")
    samples = np.asarray(samples)
    if samples.ndim == 2 and samples.shape[1] == 1:
        samples = samples[:, 0]
    if samples.ndim != 1:
        raise ValueError(f"VAD expects mono samples (1-D), got shape {samples.shape}")
    if samples.size == 0:
        return []

    pcm = _to_pcm16(samples)
    frame_len = sample_rate * frame_ms // 1000
    n_padding = max(1, padding_ms // frame_ms)
    regions = _voiced_regions(pcm, sample_rate, aggressiveness, frame_len, n_padding, threshold)
    if not regions:
        return []

    n = len(pcm)
    padded = np.zeros(-(-n // frame_len) * frame_len, np.float64)
    padded[:n] = pcm
    energy = np.mean(padded.reshape(-1, frame_len) ** 2, axis=1)

    max_len = int(max_segment_s * sample_rate)
    min_len = int(min_segment_s * sample_rate)
    segments: list[Segment] = []
    for first, end_frame in regions:
        start, end = first * frame_len, min(end_frame * frame_len, n)
        if end - start < min_len:
            continue
        segments.extend(_cut_long(start, end, energy, frame_len, max_len, min_len, n))
    return segments
