"""dstrain transcribe: the three model forms print LDC93S1's exact transcript; --json word timings; a 3-minute
recording split by VAD; folders, CSVs, other rates, channel counts and formats; CTC alignment."""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pytest
import soundfile
from conftest import DATA, SHARED, assert_says
from test_export import TEXT, VAD_FRAME, ldc93s1_model

from dstrain.decoder.config import DecoderConfig
from dstrain.export import STREAMING_TFLITE_NAME, TFLITE_NAME
from dstrain.inference import load_model
from dstrain.transcribe import (
    TranscribeConfig,
    Transcriber,
    audio_files,
    ctc_alignment,
    parse_hot_words,
    run,
)

WAV = str(DATA / "LDC93S1.wav")
FAST = DecoderConfig(beam_width=64)  # the default 1024 costs ~16 ms a frame without a scorer
SCORERS = sorted(glob.glob(str(SHARED / "data" / "scorer" / "*.scorer")))


@pytest.fixture(scope="session")
def ldc(tmp_path_factory):
    return ldc93s1_model(tmp_path_factory)


def _stdout(capsys, cfg: TranscribeConfig) -> str:
    assert run(cfg) == 0
    return capsys.readouterr().out


def test_every_model_form_prints_the_exact_transcript(ldc, capsys):
    from dstrain.cli import build_parser
    from dstrain.cli import run as cli_run

    # As launch/run_ldc93s1.sh runs it: default beam width, the transcript alone on stdout.
    assert cli_run(build_parser().parse_args(["transcribe", "--model", ldc.export_dir, "--audio", WAV])) == 0
    assert_says(capsys.readouterr().out, exactly=TEXT + "\n")
    for model in (
        os.path.join(ldc.export_dir, TFLITE_NAME),
        os.path.join(ldc.export_dir, STREAMING_TFLITE_NAME),
        ldc.run_dir,
        ldc.quantized_tflite,
    ):
        assert_says(_stdout(capsys, TranscribeConfig(model=model, audio=(WAV,), decoder=FAST)), exactly=TEXT + "\n")


def test_json_has_candidates_with_word_timings_inside_the_audio(ldc, capsys):
    decoder = DecoderConfig(beam_width=64, scorer_path=SCORERS[0]) if SCORERS else FAST
    hot_words = "wash:2.0,year:1.5" if SCORERS else ""
    out = json.loads(
        _stdout(
            capsys,
            TranscribeConfig(
                model=os.path.join(ldc.export_dir, TFLITE_NAME),
                audio=(WAV,),
                json=True,
                candidate_transcripts=2,
                hot_words=hot_words,
                decoder=decoder,
            ),
        )
    )
    assert 1 <= len(out["transcripts"]) <= 2
    best = out["transcripts"][0]
    assert isinstance(best["confidence"], float)
    words = best["words"]
    assert " ".join(w["word"] for w in words) == best["transcript"] == TEXT
    duration = len(ldc.samples) / 16000
    for word, following in zip(words, words[1:] + [None]):
        assert 0 <= word["start_time"] and word["duration"] > 0
        end = word["start_time"] + word["duration"]
        assert end <= (following["start_time"] if following else duration) + 1e-9


def _long_recording(samples: np.ndarray, seconds: float = 180.0) -> tuple[np.ndarray, list[int]]:
    """LDC93S1 repeated with 0.8-1.6 s of silence before each; every repeat starts on a multiple of 60 ms, so the
    VAD's 30 ms cuts land where the test model's training crops did (test_export._training_variants)."""
    rng = np.random.default_rng(2)
    parts, starts, position = [], [], 0
    while position < seconds * 16000:
        gap = -(-(position + int(rng.uniform(0.8, 1.6) * 16000)) // (2 * VAD_FRAME)) * 2 * VAD_FRAME - position
        parts += [np.zeros(gap, np.float32), samples]
        starts.append(position + gap)
        position += gap + len(samples)
    parts.append(np.zeros(16000, np.float32))
    return np.concatenate(parts), starts


def test_long_recording_is_split_at_pauses_and_every_segment_is_exact(ldc, tmp_path):
    audio, starts = _long_recording(ldc.samples)
    path = str(tmp_path / "long.wav")
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    cfg = TranscribeConfig(model=ldc.export_dir, audio=(path,), num_processes=2, decoder=FAST)
    result = next(Transcriber(load_model(ldc.export_dir), cfg).transcribe_files([path]))
    assert len(result.segments) == len(starts) > 40  # one segment per repeat
    for (seg_start, seg_end), start in zip(result.segments, starts):
        assert (
            seg_start <= (start + 0.3 * 16000) / 16000 and seg_end >= (start + len(ldc.samples) - 0.3 * 16000) / 16000
        )
    words = result.candidates[0].words
    for seg_start, seg_end in result.segments:
        inside = [w for w in words if seg_start <= w.start_time < seg_end]
        assert " ".join(w.word for w in inside) == TEXT
        assert all(w.start_time + w.duration <= seg_end + 1e-9 for w in inside)
    assert all(a.start_time + a.duration <= b.start_time for a, b in zip(words, words[1:]))
    assert result.transcript == " ".join([TEXT] * len(starts))


def test_folders_csvs_rates_channels_and_formats(ldc, tmp_path, capsys):
    import soxr

    (tmp_path / "in" / "sub").mkdir(parents=True)
    soundfile.write(str(tmp_path / "in" / "a.wav"), ldc.samples, 16000)
    stereo = soxr.resample(np.stack([ldc.samples, ldc.samples], axis=1), 16000, 44100)
    soundfile.write(str(tmp_path / "in" / "sub" / "b.flac"), stereo, 44100)
    soundfile.write(str(tmp_path / "in" / "sub" / "c.mp3"), soxr.resample(ldc.samples, 16000, 48000), 48000)
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["wav_filename", "wav_filesize", "transcript"], ["in/sub/b.flac", 0, TEXT]])
    inputs = (str(tmp_path / "in"), str(tmp_path / "list.csv"))
    files = audio_files(inputs)
    assert [os.path.relpath(f, tmp_path) for f in files] == [
        "in/a.wav",
        "in/sub/b.flac",
        "in/sub/c.mp3",
        "in/sub/b.flac",
    ]
    out_csv, out_json = str(tmp_path / "out.csv"), str(tmp_path / "out.json")
    printed = _stdout(capsys, TranscribeConfig(model=ldc.export_dir, audio=inputs, output=out_csv, decoder=FAST))
    assert_says(printed, exactly="".join(f"{f}: {TEXT}\n" for f in files))
    with open(out_csv, newline="") as f:
        assert list(csv.reader(f)) == [["wav_filename", "transcript"]] + [[p, TEXT] for p in files]
    missing = str(tmp_path / "missing.wav")
    cfg = TranscribeConfig(model=ldc.export_dir, audio=(files[0], missing), output=out_json, decoder=FAST)
    assert run(cfg) == 1  # the readable file is still transcribed
    records = json.load(open(out_json))
    assert records[0]["transcripts"][0]["transcript"] == TEXT and "not found" in records[1]["error"]


def test_errors_name_the_flag(ldc):
    from dstrain.audio import AudioError

    with pytest.raises(ValueError, match="--scorer_path"):
        TranscribeConfig(model="m", audio=("a",), hot_words="wash:2")
    with pytest.raises(ValueError, match="word:boost"):
        parse_hot_words("wash")
    assert parse_hot_words("wash:2, year:-1.5") == {"wash": 2.0, "year": -1.5}
    with pytest.raises(AudioError, match="not found"):
        run(TranscribeConfig(model=ldc.export_dir, audio=("/nonexistent.wav",), decoder=FAST))


def test_ctc_alignment_finds_the_best_path():
    blank = 3
    path = [1, 1, blank, 1, 2, 2, blank]  # labels 1 1 2: the repeated 1 needs the blank between
    log_probs = np.full((len(path), 4), np.log(0.1 / 3))
    log_probs[np.arange(len(path)), path] = np.log(0.9)
    first, last = ctc_alignment(log_probs, [1, 1, 2], blank)
    assert first.tolist() == [0, 3, 4] and last.tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="no CTC path"):
        ctc_alignment(log_probs[:2], [1, 1, 2], blank)
