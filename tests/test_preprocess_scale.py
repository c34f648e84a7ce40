"""Store identity across workers and MPI ranks, kill-and-resume, resampling accuracy, float16 storage."""
import csv
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from conftest import DATA, tool
from dstrain.audio import read_audio
from dstrain.store import FeatureStore
from dstrain.prep.pipeline import PreprocessConfig, preprocess


def store_digest(store) -> dict[str, str]:
    """Every file of a finished store by content (rejects, manifest and shards)."""
    return {
        name: hashlib.sha256((store / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(store))
    }


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
        proc = subprocess.run(launch + common + ["--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        stores[name] = store_digest(out)
    assert stores["one"] == stores["workers2"] == stores["mpi2"]
    m = FeatureStore.open(str(tmp_path / "one")).manifest
    assert m.utterances == 54 and m.rejects["by_reason"] == {"alphabet": 6} and len(m.shards) > 9


@pytest.mark.slow
def test_killed_run_resumes_to_the_identical_store(tmp_path, alphabet_path):
    src = many_rows_csv(tmp_path, 1500)
    args = [tool("dstrain"), "preprocess", "--csv", src, "--alphabet", alphabet_path, "--chunk_rows", "50"]
    reference = tmp_path / "reference"
    subprocess.run(args + ["--output", str(reference)], check=True, capture_output=True, timeout=600)

    store = tmp_path / "store"
    proc = subprocess.Popen(args + ["--output", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = store / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(progress.glob("chunk-*.json")) if progress.exists() else []) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "preprocessing finished before it could be killed: give it more rows"
    done = len(list(progress.glob("chunk-*.json")))
    assert 3 <= done < 30 and not (store / "_manifest.json").exists()
    # Damage one finished shard: the resumed run must notice and redo that chunk.
    victim = sorted(store.glob("shard-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])

    resumed = subprocess.run(args + ["--output", str(store)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete, resuming" in resumed.stderr
    assert store_digest(store) == store_digest(reference)


def test_float16_store_halves_features(tmp_path, alphabet_path, ldc93s1_csv):
    full = preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(tmp_path / "f32")), progress=False)
    half = preprocess(
        PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(tmp_path / "f16"), feature_dtype="float16"),
        progress=False,
    )
    assert half.feature_dtype == "float16" and half.shards[0].bytes < 0.7 * full.shards[0].bytes
    (a,) = FeatureStore.open(str(tmp_path / "f32")).reader(0).utterances()
    (b,) = FeatureStore.open(str(tmp_path / "f16")).reader(0).utterances()
    # Kept in the stored dtype: widening happens on the device.
    assert b.features.dtype == np.float16 and np.abs(a.features - b.features.astype(np.float32)).max() < 0.02
