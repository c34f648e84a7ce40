"""DeepSpeech CSVs -> validated utterances -> feature store.

Every input row ends either in a shard or in ``rejects.csv`` with a reason; the counts per reason are
returned and recorded in the manifest.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Iterable, Iterator

import fsspec
import numpy as np
from tqdm import tqdm

from dstrain.alphabet import Alphabet
from dstrain.audio import AudioError, read_audio
from dstrain.features import FeatureConfig, log_mel, power_spectrogram
from dstrain.store import MANIFEST_NAME, Manifest, StoreError, join, write_manifest
from preprocess.shard_writer import ShardWriter

CSV_COLUMNS = ("wav_filename", "wav_filesize", "transcript")


@dataclass(frozen=True)
class PreprocessConfig:
    csv_files: tuple[str, ...]
    """DeepSpeech CSVs (wav_filename,wav_filesize,transcript); relative paths resolve against each CSV's folder."""
    alphabet_path: str
    output: str
    """Store location: a local path or an fsspec URL."""
    shard_size_mb: float = 256.0
    feature_dtype: str = "float32"
    max_duration: float = 0.0
    """Seconds; longer samples are rejected. 0 means no limit."""
    workers: int = 1
    overwrite: bool = False
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not self.csv_files:
            raise ValueError("csv_files: give at least one CSV (--csv)")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"feature_dtype must be float32 or float16, got {self.feature_dtype!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Row:
    index: int
    source: str
    transcript: str


@dataclass
class Processed:
    row: Row
    reason: str | None = None
    detail: str = ""
    labels: list[int] | None = None
    log_mel: np.ndarray | None = None
    duration: float = 0.0


def read_csv_rows(csv_files: Iterable[str]) -> Iterator[Row]:
    index = 0
    for csv_file in csv_files:
        base = os.path.dirname(csv_file)
        with fsspec.open(csv_file, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("wav_filename", "transcript") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_file}: missing column(s) {missing}; DeepSpeech CSVs have {','.join(CSV_COLUMNS)}")
            for rec in reader:
                path = rec["wav_filename"]
                if "://" not in path and not os.path.isabs(path):
                    path = os.path.join(base, path)
                yield Row(index, path, rec["transcript"] or "")
                index += 1


def ctc_min_frames(labels: list[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between repeats."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


def process_row(row: Row, alphabet: Alphabet, cfg: FeatureConfig, max_duration: float) -> Processed:
    transcript = row.transcript.strip()
    if not transcript:
        return Processed(row, "empty_transcript")
    missing = alphabet.missing(transcript)
    if missing:
        return Processed(row, "alphabet", "missing characters " + " ".join(repr(c) for c in missing))
    try:
        samples = read_audio(row.source, cfg.sample_rate)
    except AudioError as e:
        reason = "missing_file" if "not found" in str(e) else ("empty_audio" if "no audio samples" in str(e) else "unreadable_audio")
        return Processed(row, reason, str(e))
    duration = samples.shape[0] / cfg.sample_rate
    if max_duration > 0 and duration > max_duration:
        return Processed(row, "too_long", f"{duration:.2f} s > --max_duration {max_duration}")
    labels = alphabet.encode(transcript)
    features = log_mel(power_spectrogram(samples, cfg), cfg)
    if features.shape[0] < ctc_min_frames(labels):
        return Processed(row, "too_short", f"{features.shape[0]} frames < {ctc_min_frames(labels)} needed by CTC")
    return Processed(row, labels=labels, log_mel=features, duration=duration)


class _Worker:
    def __init__(self, alphabet: Alphabet, cfg: FeatureConfig, max_duration: float):
        self.args = (alphabet, cfg, max_duration)

    def __call__(self, row: Row) -> Processed:
        return process_row(row, *self.args)


def preprocess(cfg: PreprocessConfig, progress: bool = True) -> Manifest:
    """Build the store; returns its manifest. Bad samples are rejected and counted, never fatal."""
    alphabet = Alphabet.from_file(cfg.alphabet_path)
    fs, root = fsspec.core.url_to_fs(cfg.output)
    if fs.exists(join(root, MANIFEST_NAME)) and not cfg.overwrite:
        raise StoreError(f"{cfg.output} already holds a finished store; pass --overwrite to rebuild it")
    fs.makedirs(root, exist_ok=True)
    if fs.exists(join(root, MANIFEST_NAME)):
        fs.rm(join(root, MANIFEST_NAME))

    rows = list(read_csv_rows(cfg.csv_files))
    work = _Worker(alphabet, cfg.features, cfg.max_duration)
    reasons: Counter[str] = Counter()
    rejects = io.StringIO()
    rejects_csv = csv.writer(rejects)
    rejects_csv.writerow(["wav_filename", "transcript", "reason", "detail"])
    with ShardWriter(cfg.output, cfg.shard_size_mb, cfg.feature_dtype) as writer:
        if cfg.workers > 1:
            pool = get_context("spawn").Pool(cfg.workers)
            results = pool.imap(work, rows, chunksize=8)  # ordered: the store does not depend on --workers
        else:
            pool, results = None, map(work, rows)
        try:
            for p in tqdm(results, total=len(rows), disable=not progress, desc="preprocess", unit="utt"):
                if p.reason is not None:
                    reasons[p.reason] += 1
                    rejects_csv.writerow([p.row.source, p.row.transcript, p.reason, p.detail])
                    continue
                writer.add(
                    id=f"{p.row.index:09d}",
                    source=p.row.source,
                    transcript=p.row.transcript.strip(),
                    labels=p.labels,
                    duration=p.duration,
                    log_mel=p.log_mel,
                )
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    with fsspec.open(join(cfg.output, "rejects.csv"), "wt", encoding="utf-8", newline="") as f:
        f.write(rejects.getvalue())
    manifest = Manifest(
        features=cfg.features.to_dict(),
        feature_dtype=cfg.feature_dtype,
        alphabet=list(alphabet.labels),
        alphabet_sha256=alphabet.sha256(),
        shards=writer.shards,
        rejects={"count": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
    )
    write_manifest(cfg.output, manifest)
    return manifest
