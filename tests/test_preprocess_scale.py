"""Store identity across workers and MPI ranks, kill-and-resume, resampling accuracy, float16 storage."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from cluster import Output, wait_for
from conftest import DATA, assert_says, tool

from dstrain.audio import read_audio
from dstrain.prep.pipeline import PreprocessConfig, preprocess
from dstrain.store import FeatureStore
from dstrain.store.layout import PROGRESS


def store_digest(store) -> dict[str, str]:
    """Every file of a finished store by content (rejects, manifest and shards)."""
    return {name: hashlib.sha256((store / name).read_bytes()).hexdigest() for name in sorted(os.listdir(store))}


def many_rows_csv(tmp_path, n: int) -> str:
    path = tmp_path / f"many{n}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["wav_filename", "wav_filesize", "transcript"])
        for i in range(n):
            # One in ten is bad, so rejects are part of what must come out identical.
            w.writerow([str(DATA / "LDC93S1.wav"), 0, "she had your dark suit" + ("!" if i % 10 == 3 else "")])
    return str(path)


def test_resampling_keeps_frequency_and_level(tmp_path):
    rate = 44100
    t = np.arange(2 * rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / "tone.wav"
    soundfile.write(str(path), stereo, rate, subtype="FLOAT")
    mono = read_audio(str(path))
    assert abs(len(mono) - 32000) <= 1
    core = mono[2000:-2000]
    spectrum = np.abs(np.fft.rfft(core * np.hanning(len(core)), n=16 * len(core)))
    peak_hz = np.argmax(spectrum) * 16000 / (16 * len(core))
    assert abs(peak_hz - 1000) < 0.5
    level_db = 20 * np.log10(np.sqrt(np.mean(core**2)) / (0.5 / np.sqrt(2)))
    assert abs(level_db) < 0.5


@pytest.mark.slow
def test_store_identical_for_workers_and_mpi_ranks(tmp_path, alphabet_path):
    src = many_rows_csv(tmp_path, 60)
    common = ["--csv", src, "--alphabet", alphabet_path, "--chunk_rows", "7", "--shard_size_mb", "0.06"]
    stores = {}
    for name, launch in {
        "one": [tool("dstrain"), "preprocess"],
        "workers2": [tool("dstrain"), "preprocess", "--workers", "2"],
        "mpi2": ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PATH"]
        + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        + [tool("dstrain"), "preprocess"],
    }.items():
        out = tmp_path / name
        env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
        proc = subprocess.run(
            launch + common + ["--output", str(out)], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        stores[name] = store_digest(out)
    assert stores["one"] == stores["workers2"] == stores["mpi2"]
    m = FeatureStore.open(str(tmp_path / "one")).manifest
    assert m.utterances == 54 and m.rejects["by_reason"] == {"alphabet": 6} and len(m.shards) > 9


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, alphabet_path):
    """1500 rows in chunks of 50, and the store an uninterrupted run makes of them."""
    tmp = tmp_path_factory.mktemp("chunked")
    args = [
        tool("dstrain"),
        "preprocess",
        "--csv",
        many_rows_csv(tmp, 1500),
        "--alphabet",
        alphabet_path,
        "--chunk_rows",
        "50",
    ]
    subprocess.run(args + ["--output", str(tmp / "reference")], check=True, capture_output=True, timeout=600)
    return args, store_digest(tmp / "reference")


def finished_chunks(store) -> set[str]:
    """The chunks a preprocessing run has finished so far: its valid markers ``_progress/chunk-CCCCCC.json`` (a marker
    being written does not parse yet; the folder goes once the store is complete)."""
    done = set()
    for marker in Path(store).glob(f"{PROGRESS}/chunk-*.json"):
        try:
            json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        done.add(marker.name)
    return done


def wait_chunks(proc: subprocess.Popen, store, chunks: int, before: set[str] = frozenset()) -> None:
    """Until the run ``proc`` writing ``store`` has finished ``chunks`` chunks beyond ``before``, or has exited."""
    wait_for(
        lambda: len(finished_chunks(store) - before) >= chunks or proc.poll() is not None,
        600,
        f"{chunks} finished chunk(s) in {store}",
        poll=0.01,
    )


def interrupt_after_chunks(cmd: list[str], chunks: int, sig: int) -> tuple[int, str]:
    """Runs ``cmd`` (with ``--output STORE``), sends ``sig`` once it has finished ``chunks`` more chunks (their
    markers in the store); (exit status, its log)."""
    store = cmd[max(i for i, arg in enumerate(cmd) if arg == "--output") + 1]
    before = finished_chunks(store)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(proc)  # (read as it comes: a full pipe would stall the run)
    try:
        wait_chunks(proc, store, chunks, before)
        if proc.poll() is None:
            proc.send_signal(sig)
        return output.finish(120), output.text
    finally:
        if proc.poll() is None:  # (a test that failed half-way)
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_to_the_identical_store(tmp_path, chunked):
    args, reference = chunked
    store = tmp_path / "store"
    status, _ = interrupt_after_chunks(args + ["--output", str(store)], 3, signal.SIGKILL)
    assert status == -signal.SIGKILL, "preprocessing finished before it could be killed: give it more rows"
    assert len(list((store / "_progress").glob("chunk-*.json"))) >= 3 and not (store / "_manifest.json").exists()
    # Damage one finished shard: the resumed run must notice and redo that chunk.
    victim = sorted(store.glob("shard-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])

    resumed = subprocess.run(args + ["--output", str(store)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_says(resumed.stderr, "already complete, resuming")
    assert store_digest(store) == reference


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_leaves_a_resumable_store_and_exits_75(tmp_path, chunked, workers):
    """scancel or a pod deletion during preprocessing: the chunks in flight are abandoned, the finished ones kept,
    exit 75; running the same command again completes the very store an uninterrupted run makes."""
    args, reference = chunked
    store = tmp_path / "store"
    cmd = args + ["--output", str(store), "--workers", str(workers)]
    status, rest = interrupt_after_chunks(cmd, 3, signal.SIGTERM)
    assert status == 75, rest[-3000:]
    assert_says(rest, "same command again", patterns=(r"^dstrain preprocess: stopped by SIGTERM: .*\s*\Z",))
    assert not (store / "_manifest.json").exists() and len(list((store / "_progress").glob("chunk-*.json"))) >= 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store_digest(store) == reference


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_naming_its_chunk_and_the_rerun_completes_the_store(tmp_path, chunked):
    """The OOM killer takes one preprocessing worker: the run ends at once (it used to wait for ever on the chunk),
    naming the chunk and the signal, exit 1; running the same command again completes the very same store."""
    import psutil

    args, reference = chunked
    store = tmp_path / "store"
    cmd = args + ["--output", str(store), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output = Output(proc, stream=proc.stderr)
    wait_chunks(proc, store, 2)  # after a chunk is done, both workers are busy with the next ones
    workers = [c for c in psutil.Process(proc.pid).children() if "multiprocessing" in " ".join(c.cmdline())]
    workers = [w for w in workers if "resource_tracker" not in " ".join(w.cmdline())]
    assert len(workers) == 2, [w.cmdline() for w in workers]
    victim = workers[0].pid
    os.kill(victim, signal.SIGKILL)
    status = output.finish(60)
    assert status == 1, output.text[-3000:]
    last = output.text.strip().splitlines()[-1]  # the last thing it says, to a person
    assert_says(last, f"worker {victim} killed by SIGKILL while preprocessing chunk ", "run the same command")
    assert not (store / "_manifest.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert store_digest(store) == reference


def test_float16_store_halves_features(tmp_path, alphabet_path, ldc93s1_csv):
    full = preprocess(
        PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(tmp_path / "f32")),
        progress=False,
    )
    half = preprocess(
        PreprocessConfig(
            csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(tmp_path / "f16"), feature_dtype="float16"
        ),
        progress=False,
    )
    assert half.feature_dtype == "float16" and half.shards[0].bytes < 0.7 * full.shards[0].bytes
    (a,) = FeatureStore.open(str(tmp_path / "f32")).reader(0).utterances()
    (b,) = FeatureStore.open(str(tmp_path / "f16")).reader(0).utterances()
    # Kept in the stored dtype: widening happens on the device.
    assert b.features.dtype == np.float16 and np.abs(a.features - b.features.astype(np.float32)).max() < 0.02
