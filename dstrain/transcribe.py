"""``dstrain transcribe``: transcripts of audio files, folders or DeepSpeech CSVs with any form of a model.

The model is an export folder (its SavedModel), a ``.tflite`` file (whole-utterance or streaming) or a training run
directory (:func:`dstrain.inference.load_model`); all three give the same transcript. Audio is read at the model's rate
and mixed to mono (:func:`dstrain.audio.read_audio`). Recordings longer than ``--max_segment_s`` are split at pauses
by WebRTC VAD (:func:`dstrain.vad.split_on_silence`, as DeepSpeech's transcribe.py did); segments are batched through
the acoustic model and beam-searched on ``--num_processes`` processes (the decoder's batch function).

``--json`` prints DeepSpeech's client output, with word timings read off the CTC alignment of each candidate::

    {"transcripts": [{"confidence": -0.86, "transcript": "she had ...",
                      "words": [{"word": "she", "start_time": 0.16, "duration": 0.14}, ...]}, ...]}

Times are seconds from the start of the recording: a word starts at the first frame of its first character and
lasts to the end of the last frame of its last character (20 ms frames). A segmented recording's candidate ``k``
joins each segment's ``k``-th best (its confidence is their sum).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from dstrain.audio import AudioError, read_audio
from dstrain.config import option
from dstrain.decoder.config import DecoderConfig
from dstrain.decoder.ctc import ctc_beam_search_decoder_batch
from dstrain.decoder.scorer import Scorer
from dstrain.features import log_mel, power_spectrogram

log = logging.getLogger("dstrain")

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3")


def parse_hot_words(value: str) -> dict[str, float]:
    """DeepSpeech's ``--hot_words``: ``word:boost,word:boost`` (a boost is a float; negative discourages)."""
    boosts = {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        word, sep, boost = item.rpartition(":")
        try:
            if not sep or not word:
                raise ValueError
            boosts[word] = float(boost)
        except ValueError:
            raise ValueError(f"hot_words: {item!r} is not word:boost (e.g. --hot_words 'wash:5.0,year:-2')") from None
    return boosts


@dataclass(frozen=True)
class TranscribeConfig:
    """dstrain transcribe: print the transcript of audio files, folders or CSVs"""

    model: str = option()
    """Export folder, .tflite file (model.tflite or model_streaming.tflite) or training run directory."""
    audio: tuple[str, ...] = option(nargs="+")
    """Audio files (WAV, FLAC, MP3; any rate and channel count), folders (searched recursively for them) or
    DeepSpeech CSVs (wav_filename column, relative paths from the CSV's folder)."""
    json: bool = False
    """Print DeepSpeech's JSON output: candidate transcripts with confidence and word timings."""
    candidate_transcripts: int = 3
    """Number of candidate transcripts in the JSON output."""
    hot_words: str = ""
    """Words to boost or discourage, word:boost,... (needs --scorer_path)."""
    output: str = ""
    """Also write the results to this file: .csv gives wav_filename,transcript; any other name JSON records."""
    max_segment_s: float = 30.0
    """Recordings longer than this (seconds) are split at pauses into segments at most this long; 0 never splits."""
    vad_aggressiveness: int = 3
    """WebRTC VAD mode for splitting, 0 (keeps the most) to 3 (filters out the most non-speech)."""
    num_processes: int = 0
    """Beam search processes when there are several segments or files; 0 means one per CPU core."""
    show_progressbar: bool = True
    """Progress bar over the files (when there are several)."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if self.candidate_transcripts < 1:
            raise ValueError(f"candidate_transcripts must be >= 1, got {self.candidate_transcripts}")
        if self.max_segment_s < 0:
            raise ValueError(f"max_segment_s must be >= 0 (0 never splits), got {self.max_segment_s}")
        if self.vad_aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"vad_aggressiveness must be 0, 1, 2 or 3, got {self.vad_aggressiveness}")
        if self.num_processes < 0:
            raise ValueError(f"num_processes must be >= 0 (0 means one per core), got {self.num_processes}")
        if parse_hot_words(self.hot_words) and not self.decoder.scorer_path:
            raise ValueError("hot_words boost words of the scorer's vocabulary: give --scorer_path too")

    @property
    def processes(self) -> int:
        return self.num_processes or os.cpu_count() or 1


# --- inputs


def audio_files(inputs: Iterable[str]) -> list[str]:
    """Files named, those under folders (sorted) and those listed in CSVs, in order."""
    files: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(AUDIO_EXTENSIONS))
        elif path.lower().endswith(".csv"):
            files.extend(_csv_files(path))
        else:
            files.append(path)
    return files


def _csv_files(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "wav_filename" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no wav_filename column (a DeepSpeech CSV: wav_filename,wav_filesize,transcript)")
        base = os.path.dirname(os.path.abspath(path))
        return [os.path.normpath(os.path.join(base, row["wav_filename"])) for row in reader]


# --- results


@dataclass(frozen=True)
class Word:
    word: str
    start_time: float
    duration: float


@dataclass(frozen=True)
class Candidate:
    confidence: float
    transcript: str
    words: tuple[Word, ...]


@dataclass
class Result:
    wav_filename: str
    candidates: list[Candidate] = field(default_factory=list)
    segments: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) seconds of each VAD segment (one segment spanning the recording when not split)."""
    error: str = ""

    @property
    def transcript(self) -> str:
        return self.candidates[0].transcript if self.candidates else ""

    def to_json(self) -> dict:
        """DeepSpeech's ``--json`` record, with the file's name."""
        return {
            "wav_filename": self.wav_filename,
            **({"error": self.error} if self.error else {}),
            "transcripts": [
                {
                    "confidence": c.confidence,
                    "transcript": c.transcript,
                    "words": [{"word": w.word, "start_time": w.start_time, "duration": w.duration} for w in c.words],
                }
                for c in self.candidates
            ],
        }


# --- CTC alignment


def ctc_alignment(log_probs: np.ndarray, labels: Sequence[int], blank: int) -> tuple[np.ndarray, np.ndarray]:
    """Most likely CTC path of ``labels`` through ``log_probs`` ``[T, C]`` (Viterbi): the first and last frame of
    each label. Raises ValueError when no path fits (more labels, with their separating blanks, than frames)."""
    n, frames = len(labels), len(log_probs)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ext = np.full(2 * n + 1, blank, np.int64)  # blank, l1, blank, l2, ..., blank
    ext[1::2] = labels
    states = len(ext)
    skip = np.zeros(states, bool)  # l(k-1) -> l(k) without a blank between: only for different labels
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    emit = np.asarray(log_probs, np.float64)[:, ext]
    alpha = np.full(states, -np.inf)
    alpha[:2] = emit[0, :2]
    back = np.zeros((frames, states), np.int8)
    cand = np.full((3, states), -np.inf)
    for t in range(1, frames):
        cand[0] = alpha
        cand[1, 1:] = alpha[:-1]
        cand[2, 2:] = np.where(skip[2:], alpha[:-2], -np.inf)
        move = np.argmax(cand, axis=0)
        alpha = cand[move, np.arange(states)] + emit[t]
        back[t] = move
    last = states - 1 if alpha[-1] >= alpha[-2] else states - 2
    if not np.isfinite(alpha[last]):
        raise ValueError(f"no CTC path of {n} labels through {frames} frames")
    path = np.empty(frames, np.int64)
    path[-1] = last
    for t in range(frames - 1, 0, -1):
        path[t - 1] = path[t] - back[t, path[t]]
    on_label = path % 2 == 1
    idx, t = path[on_label] // 2, np.nonzero(on_label)[0]
    first = np.full(n, -1, np.int64)
    last_frame = np.zeros(n, np.int64)
    first[idx[::-1]] = t[::-1]  # reversed so the earliest frame wins
    last_frame[idx] = t
    return first, last_frame


def words_of(
    labels: Sequence[int], first: np.ndarray, last: np.ndarray, alphabet, offset_s: float, step_s: float
) -> list[Word]:
    """Words (runs of non-space labels) with their times."""
    words, start = [], None
    space = alphabet.space_index
    for i, label in enumerate(list(labels) + [space]):
        if label != space and start is None:
            start = i
        elif label == space and start is not None:
            begin, end = first[start] * step_s, (last[i - 1] + 1) * step_s
            words.append(Word(alphabet.decode(labels[start:i]), round(offset_s + begin, 4), round(end - begin, 4)))
            start = None
    return words


# --- transcription


class Transcriber:
    """Segments, acoustic model, beam search and alignment for recordings, in groups that share one decoder call."""

    def __init__(self, model, cfg: TranscribeConfig, scorer: Scorer | None = None):
        self.model, self.cfg = model, cfg
        self.features = model.features
        self.scorer = scorer if scorer is not None else cfg.decoder.scorer(model.alphabet)
        self.hot_words = parse_hot_words(cfg.hot_words)
        self.step_s = self.features.step_samples / self.features.sample_rate

    def segments(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """Sample ranges to transcribe: the whole recording, or its VAD segments when it is long."""
        rate = self.features.sample_rate
        if not self.cfg.max_segment_s or len(samples) <= self.cfg.max_segment_s * rate:
            return [(0, len(samples))]
        from dstrain.vad import split_on_silence

        segs = split_on_silence(samples, rate, self.cfg.vad_aggressiveness, max_segment_s=self.cfg.max_segment_s)
        return [(s.start, s.end) for s in segs]

    def transcribe(self, samples: np.ndarray, name: str = "audio") -> Result:
        return self._transcribe_group([(name, samples)])[0]

    def transcribe_files(self, paths: Sequence[str], group_size: int = 0) -> Iterator[Result]:
        """Results in the order of ``paths``; a file that cannot be read gives a Result with ``error``."""
        group_size = group_size or 4 * self.cfg.processes
        for start in range(0, len(paths), group_size):
            group, failed = [], {}
            for path in paths[start : start + group_size]:
                try:
                    group.append((path, read_audio(path, self.features.sample_rate)))
                except AudioError as e:
                    failed[path] = str(e)
            done = {r.wav_filename: r for r in self._transcribe_group(group)}
            for path in paths[start : start + group_size]:
                yield done.get(path) or Result(path, error=failed[path])

    def _transcribe_group(self, recordings: list[tuple[str, np.ndarray]]) -> list[Result]:
        pieces = []  # (recording index, start sample, log mel)
        results = []
        for r, (name, samples) in enumerate(recordings):
            ranges = self.segments(samples)
            results.append(
                Result(
                    name, segments=[(a / self.features.sample_rate, b / self.features.sample_rate) for a, b in ranges]
                )
            )
            for a, b in ranges:
                pieces.append((r, a, log_mel(power_spectrogram(samples[a:b], self.features), self.features)))
        log_probs = self.model.log_probs([p[2] for p in pieces])
        decoded = self._decode(log_probs)
        per_recording: list[list[list[Candidate]]] = [[] for _ in recordings]
        for (r, start, _), lp, candidates in zip(pieces, log_probs, decoded):
            offset = start / self.features.sample_rate
            per_recording[r].append([self._candidate(lp, score, text, offset) for score, text in candidates])
        for result, segment_candidates in zip(results, per_recording):
            result.candidates = _join_segments(segment_candidates, self.cfg.candidate_transcripts)
        return results

    def _decode(self, log_probs: list[np.ndarray]) -> list[list[tuple[float, str]]]:
        dec = self.cfg.decoder
        todo = [i for i, x in enumerate(log_probs) if len(x)]  # a segment shorter than one window has no frames
        out: list[list[tuple[float, str]]] = [[(0.0, "")] for _ in log_probs]
        if not todo:
            return out
        lengths = [len(log_probs[i]) for i in todo]
        probs = np.zeros((len(todo), max(lengths), log_probs[todo[0]].shape[1]), np.float64)
        for row, i in enumerate(todo):
            probs[row, : lengths[row]] = np.exp(log_probs[i])
        results = ctc_beam_search_decoder_batch(
            probs,
            lengths,
            self.model.alphabet,
            dec.width(self.model.metadata.get("beam_width")),
            min(self.cfg.processes, len(todo)),
            dec.cutoff_prob,
            dec.cutoff_top_n,
            self.scorer,
            self.hot_words,
            self.cfg.candidate_transcripts,
        )
        for i, result in zip(todo, results):
            out[i] = result
        return out

    def _candidate(self, log_probs: np.ndarray, score: float, text: str, offset_s: float) -> Candidate:
        alphabet = self.model.alphabet
        labels = alphabet.encode(text)
        first, last = ctc_alignment(log_probs, labels, alphabet.blank_index)
        return Candidate(float(score), text, tuple(words_of(labels, first, last, alphabet, offset_s, self.step_s)))


def _join_segments(segment_candidates: list[list[Candidate]], count: int) -> list[Candidate]:
    """Candidate k of a recording: each segment's k-th best (its last when it has fewer)."""
    if not segment_candidates:
        return [Candidate(0.0, "", ())]
    out = []
    for k in range(min(count, max(len(c) for c in segment_candidates))):
        picks = [c[min(k, len(c) - 1)] for c in segment_candidates if c]
        out.append(
            Candidate(
                sum(p.confidence for p in picks),
                " ".join(p.transcript for p in picks if p.transcript),
                tuple(w for p in picks for w in p.words),
            )
        )
    return out


def write_results(path: str, results: Sequence[Result]) -> None:
    if path.lower().endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["wav_filename", "transcript"])
            writer.writerows([r.wav_filename, r.transcript] for r in results)
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump([r.to_json() for r in results], f, indent=2, ensure_ascii=False)
            f.write("\n")


def run(cfg: TranscribeConfig) -> int:
    """``dstrain transcribe``: transcripts on stdout (one line per file, ``path: text`` when several), or JSON."""
    from tqdm import tqdm

    from dstrain.inference import load_model

    files = audio_files(cfg.audio)
    if not files:
        raise ValueError(f"no audio files in {', '.join(cfg.audio)} (looked for {', '.join(AUDIO_EXTENSIONS)})")
    transcriber = Transcriber(load_model(cfg.model), cfg)
    several = len(files) > 1
    results = []
    bar = tqdm(total=len(files), unit="file", disable=not (several and cfg.show_progressbar))
    for result in transcriber.transcribe_files(files):
        results.append(result)
        bar.update()
        if result.error and not several:
            raise AudioError(result.error)  # one file: its error is the command's (exit status 2, the message)
        if result.error:
            log.error("%s: %s", result.wav_filename, result.error)
        elif not cfg.json:
            bar.write(f"{result.wav_filename}: {result.transcript}" if several else result.transcript)
    bar.close()
    if cfg.json:
        records = [r.to_json() for r in results]
        if not several:
            del records[0]["wav_filename"]
        print(json.dumps(records if several else records[0], indent=2, ensure_ascii=False))
    if cfg.output:
        write_results(cfg.output, results)
    return 1 if any(r.error for r in results) else 0
