import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")
pytest.importorskip("webrtcvad", reason="pip install webrtcvad-wheels")

from conftest import DATA  # noqa: E402

from dstrain.vad import Segment, split_on_silence  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def ldc93s1() -> np.ndarray:
    samples, rate = soundfile.read(str(DATA / "LDC93S1.wav"), dtype="float32")
    assert rate == SR and samples.ndim == 1
    return samples


def _check_layout(segments: list[Segment], n: int) -> None:
    for seg in segments:
        assert 0 <= seg.start < seg.end <= n
    for prev, seg in zip(segments, segments[1:]):
        assert prev.end <= seg.start, "segments overlap or are out of order"


def test_splits_repeats_at_the_pauses(ldc93s1):
    rng = np.random.default_rng(0)
    gap = 2 * SR
    repeats = 37  # 37 * (2.92 s + 2 s) + 2 s: just over 3 minutes
    parts, spans = [np.zeros(gap, np.float32)], []
    pos = gap
    for _ in range(repeats):
        parts += [ldc93s1, np.zeros(gap, np.float32)]
        spans.append((pos, pos + len(ldc93s1)))
        pos += len(ldc93s1) + gap
    audio = np.concatenate(parts)
    audio += rng.normal(0, 1e-4, len(audio)).astype(np.float32)
    assert len(audio) / SR > 180

    segments = split_on_silence(audio, SR)

    assert len(segments) == repeats
    _check_layout(segments, len(audio))
    for seg, (start, end) in zip(segments, spans):
        # Each boundary lies in the silence around its own repeat (LDC93S1 has ~0.2 s of silence
        # at each end, so the VAD may start a little after the file's first sample).
        assert start - gap < seg.start < start + int(0.3 * SR)
        assert end - int(0.3 * SR) < seg.end < end + gap
        assert len(seg.samples(audio)) == len(seg)
        # The speech itself (the loud part of the repeat) is inside the segment.
        loud = np.flatnonzero(np.abs(audio[start:end]) > 0.01)
        assert seg.start <= start + loud[0] and start + loud[-1] < seg.end


def test_long_speech_is_cut_at_quiet_frames(ldc93s1):
    speech = ldc93s1[int(0.21 * SR) : int(2.79 * SR)]  # no pause at the joins
    audio = np.tile(speech, 15)  # 38.7 s
    max_s = 10.0

    segments = split_on_silence(audio, SR, max_segment_s=max_s)

    _check_layout(segments, len(audio))
    assert all(len(seg) <= max_s * SR for seg in segments)
    assert len(segments) >= int(np.ceil(len(audio) / (max_s * SR)))
    covered = sum(len(seg) for seg in segments)
    assert covered > 0.9 * len(audio)
    # Pieces of one long stretch touch; the cut is in a quiet frame, not in the middle of a loud one.
    frame = SR * 30 // 1000
    rms = np.sqrt(np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1))
    cuts = [seg.start for prev, seg in zip(segments, segments[1:]) if prev.end == seg.start]
    assert cuts, "expected at least one max_segment_s cut"
    for cut in cuts:
        assert rms[cut // frame] < np.median(rms)

    # The default limit (30 s) cuts too.
    assert all(len(seg) <= 30 * SR for seg in split_on_silence(audio, SR))
    assert max(len(seg) for seg in split_on_silence(audio, SR)) > max_s * SR


def test_silence_gives_no_segments():
    rng = np.random.default_rng(1)
    assert split_on_silence(np.zeros(10 * SR, np.float32)) == []
    assert split_on_silence(rng.normal(0, 1e-4, 10 * SR).astype(np.float32)) == []
    assert split_on_silence(np.zeros(0, np.float32)) == []


def test_speech_to_the_end_is_kept(ldc93s1):
    audio = np.concatenate([np.zeros(SR, np.float32), ldc93s1[: int(2.0 * SR) + 123]])  # ends mid-speech, mid-frame
    segments = split_on_silence(audio)
    assert segments and segments[-1].end == len(audio)


@pytest.mark.parametrize("rate", [22050, 44100, 11025])
def test_unsupported_sample_rate(rate):
    with pytest.raises(ValueError, match="sample rate"):
        split_on_silence(np.zeros(rate, np.float32), sample_rate=rate)


@pytest.mark.parametrize(
    "kwargs",
    [{"frame_ms": 25}, {"aggressiveness": 4}, {"padding_ms": 10}, {"max_segment_s": 0.01}, {"min_segment_s": 40.0}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        split_on_silence(np.zeros(SR, np.float32), **kwargs)


def test_other_rates_and_int16(ldc93s1):
    audio = np.concatenate([np.zeros(SR, np.float32), ldc93s1, np.zeros(SR, np.float32)])
    pcm = (audio * 32767).astype(np.int16)
    assert split_on_silence(pcm) == split_on_silence(audio)
    up = np.repeat(audio, 3)  # crude 48 kHz: the VAD still finds one utterance
    segments = split_on_silence(up, sample_rate=48000)
    assert len(segments) == 1 and segments[0].seconds(48000)[0] < 1.3
