"""DeepSpeech CSVs -> validated utterances -> feature store.

Every input row ends either in a shard or in ``rejects.csv`` with a reason; the counts per reason are
returned and recorded in the manifest.

The unit of work is a *chunk*: ``--chunk_rows`` consecutive input rows. A chunk writes its shards
(``shard-CCCCCC-PPP.parquet``) and then a marker ``_progress/chunk-CCCCCC.json`` naming them with their
checksums and the chunk's rejects. Chunk boundaries depend only on the input, so the store is the same for
any ``--workers`` and any number of MPI ranks, and a killed run resumes by redoing only the chunks without a
valid marker. Rank 0 writes ``rejects.csv`` and, last, ``manifest.json``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Iterable, Iterator

import fsspec
import numpy as np
from tqdm import tqdm

from dstrain.alphabet import Alphabet
from dstrain.audio import AudioError, read_audio
from dstrain.features import FeatureConfig, log_mel, power_spectrogram
from dstrain.store import MANIFEST_NAME, Manifest, ShardInfo, StoreError, file_sha256, join, write_manifest
from preprocess.distributed import World, mpi_world
from preprocess.shard_writer import ShardWriter

log = logging.getLogger("dstrain.preprocess")
CSV_COLUMNS = ("wav_filename", "wav_filesize", "transcript")
PROGRESS_DIR = "_progress"
REJECT_COLUMNS = ["wav_filename", "transcript", "reason", "detail"]


@dataclass(frozen=True)
class PreprocessConfig:
    csv_files: tuple[str, ...]
    """DeepSpeech CSVs (wav_filename,wav_filesize,transcript); relative paths resolve against each CSV's folder."""
    alphabet_path: str
    output: str
    """Store location: a local path or an fsspec URL."""
    shard_size_mb: float = 256.0
    """Shards close once their features reach this many MiB (before compression)."""
    feature_dtype: str = "float32"
    max_duration: float = 0.0
    """Seconds; longer samples are rejected. 0 means no limit."""
    workers: int = 1
    """Processes on this node."""
    chunk_rows: int = 2000
    """Input rows per unit of work; fixes shard boundaries independently of workers and ranks."""
    overwrite: bool = False
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not self.csv_files:
            raise ValueError("csv_files: give at least one CSV (--csv)")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"feature_dtype must be float32 or float16, got {self.feature_dtype!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")


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
        try:
            f = fsspec.open(csv_file, "rt", encoding="utf-8", newline="").open()
        except FileNotFoundError:
            raise FileNotFoundError(f"CSV not found: {csv_file} (--csv)") from None
        with f:
            reader = csv.DictReader(f)
            missing = [c for c in ("wav_filename", "transcript") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_file}: missing column(s) {missing}; DeepSpeech CSVs have {','.join(CSV_COLUMNS)}")
            for rec in reader:
                path = rec["wav_filename"]
                if "://" not in path and not os.path.isabs(path):
                    path = os.path.join(base, path) if "://" not in base else f"{base.rstrip('/')}/{path}"
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


def _marker(store: str, chunk: int) -> str:
    return join(join(store, PROGRESS_DIR), f"chunk-{chunk:06d}.json")


class ChunkJob:
    """Processes one chunk end to end; picklable, so a process pool can run it."""

    def __init__(self, cfg: PreprocessConfig, alphabet: Alphabet, rows: list[Row]):
        self.cfg, self.alphabet, self.rows = cfg, alphabet, rows

    def __call__(self, chunk: int) -> int:
        cfg = self.cfg
        start = chunk * cfg.chunk_rows
        rejects = []
        pattern = f"shard-{chunk:06d}-%03d.parquet"
        with ShardWriter(cfg.output, cfg.shard_size_mb, cfg.feature_dtype, pattern=pattern) as writer:
            for row in self.rows[start : start + cfg.chunk_rows]:
                p = process_row(row, self.alphabet, cfg.features, cfg.max_duration)
                if p.reason is not None:
                    rejects.append([row.source, row.transcript, p.reason, p.detail])
                    continue
                writer.add(
                    id=f"{row.index:09d}", source=row.source, transcript=row.transcript.strip(),
                    labels=p.labels, duration=p.duration, log_mel=p.log_mel,
                )  # fmt: skip
        marker = {"chunk": chunk, "shards": [asdict(s) for s in writer.shards], "rejects": rejects}
        with fsspec.open(_marker(cfg.output, chunk), "wt", encoding="utf-8") as f:
            json.dump(marker, f)
        return chunk


def _read_marker(store: str, chunk: int, verify: bool) -> dict | None:
    """A chunk's marker if the chunk is complete (its shards present with the recorded checksums)."""
    try:
        with fsspec.open(_marker(store, chunk), "rt", encoding="utf-8") as f:
            marker = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if verify:
        for s in marker["shards"]:
            try:
                if file_sha256(join(store, s["path"])) != s["sha256"]:
                    return None
            except FileNotFoundError:
                return None
    return marker


def _fingerprint(cfg: PreprocessConfig, alphabet: Alphabet, rows: list[Row]) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "overwrite", "output")}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(alphabet.sha256().encode())
    for r in rows:
        h.update(f"{r.source}\t{r.transcript}\n".encode())
    return h.hexdigest()


def preprocess(cfg: PreprocessConfig, progress: bool = True, world: World | None = None) -> Manifest | None:
    """Build the store; rank 0 returns its manifest (other MPI ranks return None).

    Bad samples are rejected and counted, never fatal. Complete chunks of an earlier, interrupted run with the
    same inputs and settings are kept.
    """
    world = world or mpi_world()
    alphabet = Alphabet.from_file(cfg.alphabet_path)
    rows = list(read_csv_rows(cfg.csv_files))
    fs, root = fsspec.core.url_to_fs(cfg.output)
    fingerprint = _fingerprint(cfg, alphabet, rows)
    plan_path = join(join(cfg.output, PROGRESS_DIR), "plan.json")

    error = None
    if world.rank == 0:
        try:
            if fs.exists(join(root, MANIFEST_NAME)):
                if not cfg.overwrite:
                    raise StoreError(f"{cfg.output} already holds a finished store; pass --overwrite to rebuild it")
                fs.rm(root, recursive=True)
            fs.makedirs(join(root, PROGRESS_DIR), exist_ok=True)
            if fs.exists(join(join(root, PROGRESS_DIR), "plan.json")):
                with fsspec.open(plan_path, "rt") as f:
                    previous = json.load(f)["fingerprint"]
                if previous != fingerprint:
                    if not cfg.overwrite:
                        raise StoreError(
                            f"{cfg.output} holds an unfinished store made from other inputs or settings; "
                            "pass --overwrite to start it again, or give another --output"
                        )
                    fs.rm(root, recursive=True)
                    fs.makedirs(join(root, PROGRESS_DIR), exist_ok=True)
            with fsspec.open(plan_path, "wt") as f:
                json.dump({"fingerprint": fingerprint, "rows": len(rows), "chunk_rows": cfg.chunk_rows}, f)
        except StoreError as e:
            error = str(e)
    error = world.bcast(error)  # every rank stops on a configuration error, not only rank 0
    if error:
        raise StoreError(error)

    n_chunks = -(-len(rows) // cfg.chunk_rows)
    mine = list(range(world.rank, n_chunks, world.size))
    todo = [c for c in mine if _read_marker(cfg.output, c, verify=True) is None]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d chunk(s) already complete, resuming", world.rank, len(mine) - len(todo), len(mine))
    job = ChunkJob(cfg, alphabet, rows)
    bar = tqdm(total=len(todo), disable=not progress or world.rank != 0, desc="preprocess", unit="chunk")
    if cfg.workers > 1 and len(todo) > 1:
        with get_context("spawn").Pool(min(cfg.workers, len(todo))) as pool:
            for _ in pool.imap_unordered(job, todo):
                bar.update()
    else:
        for chunk in todo:
            job(chunk)
            bar.update()
    bar.close()

    world.gather(len(todo))  # rank 0 assembles once every rank is done
    if world.rank != 0:
        return None
    shards: list[ShardInfo] = []
    reasons: Counter[str] = Counter()
    rejects = io.StringIO()
    writer = csv.writer(rejects, lineterminator="\n")
    writer.writerow(REJECT_COLUMNS)
    for chunk in range(n_chunks):
        marker = _read_marker(cfg.output, chunk, verify=False)
        if marker is None:
            raise StoreError(f"chunk {chunk} has no marker after every rank finished; re-run to complete it")
        shards += [ShardInfo(**s) for s in marker["shards"]]
        for r in marker["rejects"]:
            reasons[r[2]] += 1
            writer.writerow(r)
    with fsspec.open(join(cfg.output, "rejects.csv"), "wt", encoding="utf-8", newline="") as f:
        f.write(rejects.getvalue())
    manifest = Manifest(
        features=cfg.features.to_dict(),
        feature_dtype=cfg.feature_dtype,
        alphabet=list(alphabet.labels),
        alphabet_sha256=alphabet.sha256(),
        shards=shards,
        rejects={"count": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
    )
    write_manifest(cfg.output, manifest)
    fs.rm(join(root, PROGRESS_DIR), recursive=True)
    return manifest
