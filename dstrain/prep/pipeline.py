"""DeepSpeech CSVs -> validated utterances -> feature store.

Every input row ends either in a shard or in ``_rejects.csv`` with a reason; the counts per reason are
returned and recorded in the manifest.

The unit of work is a *chunk*: ``--chunk_rows`` consecutive input rows. A chunk writes its shards
(``shard-CCCCCC-PPP.parquet``) and then a marker ``_progress/chunk-CCCCCC.json`` naming them with their
checksums and the chunk's rejects. Chunk boundaries depend only on the input, so the store is the same for
any ``--workers`` and any number of MPI ranks, and a killed run resumes by redoing only the chunks without a
valid marker. Rank 0 writes ``_rejects.csv`` and, last, ``_manifest.json``.

A stop request (SIGTERM, SIGUSR1: ``scancel``, a pod deletion) makes every process abandon the chunk it is on (its
partial shards get no marker), keep the chunks already complete, and exit 75; the same command then finishes the
store, identical to one made without interruption.

With ``--augment ... --augment_copies K`` (:mod:`dstrain.augment.waveform`) each utterance is followed by K augmented
copies, made from its waveform in the same chunk and written to the chunk's own ``shard-CCCCCC-aug-PPP.parquet``
shards (flagged ``augmented`` in the manifest, ids ``ID-augK``), so the loader can weight or leave them out by row
group.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

from dstrain import preemption
from dstrain.alphabet import Alphabet, UTF8Alphabet, ctc_min_frames
from dstrain.audio import AudioError, read_audio
from dstrain.augment.waveform import (
    REJECT_PREFIX,
    AugmentConfig,
    AugmentTally,
    WaveAugmenter,
    copy_id,
    manifest_section,
)
from dstrain.config import option, parse_list
from dstrain.distributed import World, mpi_world
from dstrain.features import FeatureConfig, log_mel, power_spectrogram
from dstrain.preemption import Preempted
from dstrain.prep.csvfile import Row, read_csv_rows
from dstrain.store import Manifest, ShardInfo, ShardWriter, StoreError, StoreLayout
from dstrain.store.layout import MANIFEST, PROGRESS, REJECTS
from dstrain.store.stats import FeatureStats

log = logging.getLogger("dstrain.preprocess")
REJECT_COLUMNS = ["wav_filename", "transcript", "reason", "detail"]


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """dstrain preprocess: DeepSpeech CSVs -> sharded Parquet feature store"""

    csv_files: tuple[str, ...] = option(names=("--csv",), parse=parse_list)
    """DeepSpeech CSV file(s), comma-separated (wav_filename,wav_filesize,transcript); relative audio paths resolve
    against each CSV's folder."""
    alphabet_path: str = option("", names=("--alphabet", "--alphabet_config_path"))
    """alphabet.txt, DeepSpeech format."""
    output: str = option()
    """Store location: a local path or an fsspec URL (memory://, s3://, ...)."""
    shard_size_mb: float = 256.0
    """Shards close once their features reach this many MiB (before compression)."""
    feature_dtype: str = option("float32", choices=("float32", "float16"))
    """Stored feature precision."""
    max_duration: float = 0.0
    """Reject longer samples, in seconds; 0 means no limit."""
    workers: int = 1
    """Processes on this node; across nodes use mpirun/srun."""
    chunk_rows: int = 2000
    """Input rows per unit of work; fixes shard boundaries independently of workers and ranks."""
    row_group_rows: int = 256
    """Utterances per Parquet row group, the unit the training loader reads and shuffles across."""
    overwrite: bool = False
    """Rebuild a store that is already complete."""
    bytes_output_mode: bool = False
    """Store labels as UTF-8 bytes (DeepSpeech's --bytes_output_mode: any language, no alphabet needed;
    --alphabet may be omitted)."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augmentation: AugmentConfig = option(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not self.csv_files:
            raise ValueError("csv_files: give at least one CSV (--csv)")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"feature_dtype must be float32 or float16, got {self.feature_dtype!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {self.row_group_rows}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if not self.alphabet_path and not self.bytes_output_mode:
            raise ValueError("give --alphabet (or --bytes_output_mode)")

    def alphabet(self) -> Alphabet | UTF8Alphabet:
        return UTF8Alphabet() if self.bytes_output_mode else Alphabet.from_file(self.alphabet_path)


@dataclass
class Processed:
    row: Row
    reason: str | None = None
    detail: str = ""
    labels: list[int] | None = None
    log_mel: np.ndarray | None = None
    duration: float = 0.0
    samples: np.ndarray | None = None
    """The waveform the features came from (augmented copies start from it)."""


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
        reason = (
            "missing_file"
            if "not found" in str(e)
            else ("empty_audio" if "no audio samples" in str(e) else "unreadable_audio")
        )
        return Processed(row, reason, str(e))
    return featurize(row, samples, alphabet.encode(transcript), cfg, max_duration)


def featurize(row: Row, samples: np.ndarray, labels: list[int], cfg: FeatureConfig, max_duration: float) -> Processed:
    """Features of a waveform, or why it cannot be stored (an original or an augmented copy)."""
    duration = samples.shape[0] / cfg.sample_rate
    if max_duration > 0 and duration > max_duration:
        return Processed(row, "too_long", f"{duration:.2f} s > --max_duration {max_duration}")
    features = log_mel(power_spectrogram(samples, cfg), cfg)
    if features.shape[0] < ctc_min_frames(labels):
        return Processed(row, "too_short", f"{features.shape[0]} frames < {ctc_min_frames(labels)} needed by CTC")
    return Processed(row, labels=labels, log_mel=features, duration=duration, samples=samples)


_ABANDON = None  # in pool workers: the parent's Event, set when a stop request came (see preprocess)
_STARTED = None  # in pool workers: where each says which chunk it starts, so the parent can name a lost one


class WorkerLost(RuntimeError):
    """A preprocessing worker died (the OOM killer, a signal): the run stops instead of waiting for its chunk."""


def _worker_init(abandon, started) -> None:
    """Pool workers leave stop requests to the parent (a signal to the whole process group reaches them too), which
    tells them through ``abandon``."""
    global _ABANDON, _STARTED
    _ABANDON, _STARTED = abandon, started
    for sig in preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _stop_requested() -> bool:
    return _ABANDON.is_set() if _ABANDON is not None else preemption.requested()


class _Abandoned(Exception):
    pass


class ChunkJob:
    """Processes one chunk end to end; picklable, so a process pool can run it. Returns (chunk, utterances, rejected),
    or None when a stop request made it abandon the chunk (its shards are incomplete and it has no marker: a rerun
    redoes it)."""

    def __init__(
        self, cfg: PreprocessConfig, alphabet: Alphabet, rows: list[Row], augmenter: WaveAugmenter | None = None
    ):
        self.cfg, self.alphabet, self.rows, self.augmenter = cfg, alphabet, rows, augmenter

    def __call__(self, chunk: int) -> tuple[int, int, int] | None:
        if _STARTED is not None:
            _STARTED.put((os.getpid(), chunk))
        try:
            return self._run(chunk)
        except _Abandoned:
            return None

    def _run(self, chunk: int) -> tuple[int, int, int]:
        cfg = self.cfg
        start = chunk * cfg.chunk_rows
        rejects = []
        stats = FeatureStats.empty(cfg.features.n_mel)
        layout = StoreLayout(cfg.output)
        tally = AugmentTally()
        with (
            ShardWriter(
                layout,
                lambda part: layout.shard_name(chunk, part),
                cfg.shard_size_mb,
                cfg.feature_dtype,
                cfg.row_group_rows,
            ) as writer,
            ShardWriter(
                layout,
                lambda part: layout.shard_name(chunk, part, augmented=True),
                cfg.shard_size_mb,
                cfg.feature_dtype,
                cfg.row_group_rows,
                augmented=True,
            ) as copies,
        ):
            for row in self.rows[start : start + cfg.chunk_rows]:
                if _stop_requested():
                    raise _Abandoned  # the writer does not flush on an exception: no shard of it is final
                p = process_row(row, self.alphabet, cfg.features, cfg.max_duration)
                if p.reason is not None:
                    rejects.append([row.source, row.transcript, p.reason, p.detail])
                    continue
                writer.add(
                    id=f"{row.index:09d}",
                    source=row.source,
                    transcript=row.transcript.strip(),
                    labels=p.labels,
                    duration=p.duration,
                    log_mel=p.log_mel,
                )
                # Statistics of what is stored (float16 rounding included), for input normalisation; of the originals
                # only, which is what the model will be given at inference.
                stats = stats.merge(FeatureStats.from_features(p.log_mel.astype(cfg.feature_dtype)))
                if self.augmenter is not None:
                    self._add_copies(row, p, copies, rejects, tally)
        shards = writer.shards + copies.shards
        marker = {"chunk": chunk, "shards": [asdict(s) for s in shards], "rejects": rejects, "stats": stats.to_dict()}
        if self.augmenter is not None:
            marker["augmentation"] = tally.to_dict()
        layout.write_atomic(layout.chunk_marker_name(chunk), json.dumps(marker))
        return chunk, sum(s.rows for s in shards), len(rejects)

    def _add_copies(
        self, row: Row, original: Processed, writer: ShardWriter, rejects: list, tally: AugmentTally
    ) -> None:
        """The augmented copies of one stored utterance; those that cannot be stored are rejected as
        ``augmented_<reason>``, naming the copy and the ops applied."""
        cfg = self.cfg
        for k in range(1, self.augmenter.n_copies + 1):
            if _stop_requested():
                raise _Abandoned
            samples, applied = self.augmenter.copy(original.samples, row.index, k)
            c = featurize(row, samples, original.labels, cfg.features, cfg.max_duration)
            if c.reason is not None:
                tally.rejects[REJECT_PREFIX + c.reason] += 1
                ops = "+".join(applied) or "unchanged"
                rejects.append([row.source, row.transcript, REJECT_PREFIX + c.reason, f"copy {k} ({ops}): {c.detail}"])
                continue
            tally.count(applied)
            writer.add(
                id=copy_id(f"{row.index:09d}", k),
                source=row.source,
                transcript=row.transcript.strip(),
                labels=c.labels,
                duration=c.duration,
                log_mel=c.log_mel,
            )


def _read_marker(layout: StoreLayout, chunk: int, verify: bool) -> dict | None:
    """A chunk's marker if the chunk is complete (its shards present with the recorded checksums)."""
    try:
        with layout.open(layout.chunk_marker_name(chunk), "rt", encoding="utf-8") as f:
            marker = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if verify:
        for s in marker["shards"]:
            try:
                if layout.sha256(s["path"]) != s["sha256"]:
                    return None
            except FileNotFoundError:
                return None
    return marker


def _fingerprint(cfg: PreprocessConfig, alphabet: Alphabet, rows: list[Row], augmenter: WaveAugmenter | None) -> str:
    h = hashlib.sha256()
    if augmenter is not None:
        h.update(augmenter.fingerprint().encode())
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
    alphabet = cfg.alphabet()
    rows = list(read_csv_rows(cfg.csv_files))
    layout = StoreLayout(cfg.output)
    augmenter = WaveAugmenter.build(cfg.augmentation, cfg.features.sample_rate)  # lists noise corpora: every rank
    fingerprint = _fingerprint(cfg, alphabet, rows, augmenter)

    error = None
    if world.rank == 0:
        try:
            _prepare(layout, cfg, fingerprint, len(rows))
        except StoreError as e:
            error = str(e)
    error = world.broadcast_object(error)  # every rank stops on a configuration error, not only rank 0
    if error:
        raise StoreError(error)

    n_chunks = -(-len(rows) // cfg.chunk_rows)
    mine = list(range(world.rank, n_chunks, world.size))
    todo = [c for c in mine if _read_marker(layout, c, verify=True) is None]
    if len(todo) < len(mine):
        log.info(
            "rank %d: %d of its %d chunk(s) already complete, resuming", world.rank, len(mine) - len(todo), len(mine)
        )
    job = ChunkJob(cfg, alphabet, rows, augmenter)
    bar = tqdm(total=len(todo), disable=not progress or world.rank != 0, desc="preprocess", unit="chunk")
    done = 0

    def finished(result: tuple[int, int, int] | None) -> None:
        nonlocal done
        if result is not None:
            done += 1
            bar.update()
            log.info(
                "chunk %d done (%d of %d this run): %d utterances, %d rejected", result[0], done, len(todo), *result[1:]
            )

    if cfg.workers > 1 and len(todo) > 1:
        _run_pool(job, todo, min(cfg.workers, len(todo)), finished)
    else:
        for chunk in todo:
            finished(job(chunk))
            if preemption.requested():
                break
    bar.close()

    # Every rank stops here, finished or stopped; then rank 0 assembles, unless a rank was asked to stop.
    stopped = world.allreduce([1.0 if preemption.requested() else 0.0], op="max")[0] > 0
    if stopped:
        complete = sum(_read_marker(layout, c, verify=False) is not None for c in range(n_chunks))
        raise Preempted(
            f"stopped by {preemption.signal_name() or 'a request on another rank'}: {complete} of {n_chunks} "
            f"chunks complete; run the same command again to finish the store"
        )
    if world.rank != 0:
        return None
    return _finish(layout, cfg, alphabet, n_chunks, augmenter)


def _run_pool(job: ChunkJob, todo: list[int], workers: int, finished) -> None:
    """The chunks on a pool of worker processes. A stop request makes the workers abandon their chunks. A worker that
    dies (the OOM killer, a signal) breaks the pool at once (concurrent.futures notices the process's end, where
    multiprocessing.Pool would replace it and wait for ever on its chunk): :class:`WorkerLost` names its chunk and
    signal, and the rerun redoes the chunks left without a marker."""
    ctx = get_context("spawn")
    abandon, started = ctx.Event(), ctx.SimpleQueue()
    working: dict[int, int] = {}  # worker pid -> the chunk it last started
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(abandon, started))
    try:
        pending = {pool.submit(job, c) for c in todo}
        while pending:
            if preemption.requested():
                abandon.set()  # workers give up their chunks; the chunks still queued return at once
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            while not started.empty():
                pid, chunk = started.get()
                working[pid] = chunk
            for future in done:
                try:
                    finished(future.result())
                except BrokenProcessPool:
                    lost = _lost_worker(pool, working)
                    # The others ignore SIGTERM (stop requests are the parent's), which the executor sends them: they
                    # would finish their chunks first. Their chunks are redone by the rerun anyway.
                    abandon.set()
                    for process in list((getattr(pool, "_processes", None) or {}).values()):
                        process.kill()
                    raise WorkerLost(lost) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _lost_worker(pool: ProcessPoolExecutor, working: dict[int, int]) -> str:
    """What to tell of a broken pool: which worker died, by which signal, on which chunk."""
    # The executor keeps its processes by pid (a private attribute; without it the message names no pid). Its own
    # thread may be reaping the dead one right now: its exit code can take a moment to show.
    processes = dict(getattr(pool, "_processes", None) or {})
    deadline = time.monotonic() + 2.0
    while True:
        dead = [(pid, p.exitcode) for pid, p in processes.items() if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    parts = []
    for pid, code in dead or [(None, None)]:
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with {code}"
        chunk = working.get(pid)
        parts.append(
            f"worker {pid} {how}" + (f" while preprocessing chunk {chunk}" if chunk is not None else "")
            if pid is not None
            else "a worker died"
        )
    return (
        f"dstrain preprocess: {'; '.join(parts)} (out of memory? try fewer --workers); the chunks finished so far "
        "are kept: run the same command again to resume"
    )


def _prepare(layout: StoreLayout, cfg: PreprocessConfig, fingerprint: str, n_rows: int) -> None:
    """Rank 0: refuse or clear what is in the way, then record what this run makes (its fingerprint)."""
    if layout.manifest_name != MANIFEST or layout.exists(MANIFEST):
        if not cfg.overwrite:
            raise StoreError(f"{cfg.output} already holds a finished store; pass --overwrite to rebuild it")
        layout.remove()
    layout.makedirs(PROGRESS)
    if layout.exists(layout.plan_name()):
        with layout.open(layout.plan_name(), "rt") as f:
            previous = json.load(f)["fingerprint"]
        if previous != fingerprint:
            if not cfg.overwrite:
                raise StoreError(
                    f"{cfg.output} holds an unfinished store made from other inputs or settings; "
                    "pass --overwrite to start it again, or give another --output"
                )
            layout.remove()
            layout.makedirs(PROGRESS)
    layout.write_atomic(
        layout.plan_name(), json.dumps({"fingerprint": fingerprint, "rows": n_rows, "chunk_rows": cfg.chunk_rows})
    )


def _finish(
    layout: StoreLayout, cfg: PreprocessConfig, alphabet: Alphabet, n_chunks: int, augmenter: WaveAugmenter | None
) -> Manifest:
    """Rank 0: gather every chunk's shards and rejects into _rejects.csv and, last, the manifest."""
    shards: list[ShardInfo] = []
    tally = AugmentTally()
    stats: list[FeatureStats] = []
    reasons: Counter[str] = Counter()
    rejects = io.StringIO()
    writer = csv.writer(rejects, lineterminator="\n")
    writer.writerow(REJECT_COLUMNS)
    for chunk in range(n_chunks):
        marker = _read_marker(layout, chunk, verify=False)
        if marker is None:
            raise StoreError(f"chunk {chunk} has no marker after every rank finished; re-run to complete it")
        shards += [ShardInfo(**s) for s in marker["shards"]]
        stats.append(FeatureStats.from_dict(marker["stats"]))
        tally = tally.merge(AugmentTally.from_dict(marker.get("augmentation", {})))
        for r in marker["rejects"]:
            reasons[r[2]] += 1
            writer.writerow(r)
    layout.write_atomic(REJECTS, rejects.getvalue())
    manifest = Manifest(
        features=cfg.features.to_dict(),
        feature_dtype=cfg.feature_dtype,
        alphabet=[] if cfg.bytes_output_mode else list(alphabet.labels),
        alphabet_sha256=alphabet.sha256(),
        shards=shards,
        rejects={"count": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        feature_stats=FeatureStats.merge_all(stats).to_dict(),  # in chunk order: the same for any workers or ranks
        bytes_output_mode=cfg.bytes_output_mode,
        augmentation=None
        if augmenter is None
        else manifest_section(cfg.augmentation, augmenter, tally, sum(s.rows for s in shards if s.augmented)),
    )
    layout.write_atomic(MANIFEST, manifest.to_json())  # last: a store without it is never read as finished
    layout.remove(PROGRESS)
    return manifest


def run(cfg: PreprocessConfig) -> int:
    """``dstrain preprocess``: exit status 75 after a stop request (the store is left resumable)."""
    try:
        m = preprocess(cfg, progress=sys.stderr.isatty())
    except Preempted as e:
        print(f"dstrain preprocess: {e}", file=sys.stderr)
        return e.exit_code
    except WorkerLost as e:
        print(e, file=sys.stderr)
        return 1
    if m is None:  # an MPI rank other than 0: rank 0 reports
        return 0
    print(f"{m.utterances} utterances ({m.hours * 3600:.1f} s) in {len(m.shards)} shard(s) at {cfg.output}")
    rejected = m.rejects.get("count", 0)
    print(
        f"{rejected} rejected"
        + "".join(f", {n} {r}" for r, n in m.rejects.get("by_reason", {}).items())
        + (f" (see {StoreLayout(cfg.output).url(REJECTS)})" if rejected else "")
    )
    if m.augmentation:
        a = m.augmentation
        seconds = sum(s.seconds for s in m.shards if s.augmented)
        print(
            f"of which {a['utterances']} augmented copies ({seconds:.1f} s), ops applied: "
            + ", ".join(f"{op} {n}" for op, n in a["applied"].items())
            + (f"; {a['rejects']['count']} copies rejected" if a["rejects"]["count"] else "")
        )
    return 0
