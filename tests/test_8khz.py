"""An 8 kHz corpus end to end, as DeepSpeech's --audio_sample_rate 8000 allowed: espeak-ng clips resampled to 8 kHz by
sox, preprocessed with --audio_sample_rate 8000, trained briefly on 2 ranks, exported, and transcribed at 8 kHz (an
8 kHz file, and a 16 kHz one that dstrain transcribe resamples to the model's rate)."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, SHARED, assert_says, final_digests, records, tool
from test_training import horovodrun, run

SYNTH = SHARED / "tools" / "synth_cv_corpus.py"
ALPHABET = str(DATA / "alphabet.txt")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SYNTH.exists(), reason="needs ../shared/tools/synth_cv_corpus.py"),
]


def _corpus(root) -> tuple[str, list[dict]]:
    """4 espeak-ng clips (48 kHz MP3s from the shared tool) as 8 kHz 16-bit WAVs, and their DeepSpeech CSV."""
    for exe in ("espeak-ng", "sox", "lame"):
        if not shutil.which(exe):
            pytest.fail(f"{exe} missing: tools/install.sh --test installs espeak-ng, sox and lame")
    cv = root / "cv"
    subprocess.run(
        [
            sys.executable,
            str(SYNTH),
            "--sentences",
            str(SHARED / "data" / "smoke" / "vocab.txt"),
            "--out",
            str(cv),
            "--clips",
            "4",
            "--speakers",
            "1",
            "--max-words",
            "3",
            "--seed",
            "3",
            "--jobs",
            "2",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = []
    with open(cv / "validated.tsv", encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            name = os.path.splitext(r["path"])[0]
            decoded, wav = root / f"{name}-48k.wav", root / f"{name}.wav"
            # sox here has no MP3 reader: lame decodes, sox resamples (its default high-quality filter).
            subprocess.run(
                ["lame", "--quiet", "--decode", str(cv / "clips" / r["path"]), str(decoded)], check=True, timeout=60
            )
            subprocess.run(["sox", str(decoded), "-r", "8000", "-c", "1", "-b", "16", str(wav)], check=True, timeout=60)
            rows.append({"wav_filename": str(wav), "wav_filesize": os.path.getsize(wav), "transcript": r["sentence"]})
    path = root / "8k.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["wav_filename", "wav_filesize", "transcript"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path), rows


@pytest.mark.timeout(600)
def test_8khz_corpus_trains_and_transcribes_at_8khz(tmp_path):
    import soundfile

    from dstrain.audio import read_audio
    from dstrain.decoder import ctc_beam_search_decoder
    from dstrain.export import read_export_metadata
    from dstrain.features import FeatureConfig, log_mel, power_spectrogram
    from dstrain.inference import load_model
    from dstrain.rundir import RunDir
    from dstrain.store import FeatureStore

    csv_path, rows = _corpus(tmp_path)
    assert {soundfile.info(r["wav_filename"]).samplerate for r in rows} == {8000}
    store = str(tmp_path / "store")
    prep = run(
        [
            tool("dstrain"),
            "preprocess",
            "--csv",
            csv_path,
            "--alphabet",
            ALPHABET,
            "--output",
            store,
            "--audio_sample_rate",
            "8000",
        ]
    )
    assert prep.returncode == 0, prep.stdout[-3000:]
    manifest = FeatureStore.open(store).manifest
    features = manifest.feature_config()
    # 32 ms windows of 256 samples every 160 (20 ms), mel filters up to 4 kHz: DeepSpeech's --audio_sample_rate 8000.
    assert (
        features == FeatureConfig(sample_rate=8000) and features.upper_hz == 4000.0 and features.window_samples == 256
    )
    assert manifest.utterances == len(rows) and not manifest.rejects["count"]
    utterances = {
        u.transcript: u for i in range(len(manifest.shards)) for u in FeatureStore.open(store).reader(i).utterances()
    }
    assert len(utterances) == len(rows)
    clip = rows[0]
    samples = read_audio(clip["wav_filename"], 8000)
    stored = utterances[clip["transcript"]].features
    assert stored.shape[0] == features.n_frames(len(samples)) == 1 + (len(samples) - 256) // 160

    # Training checks the stores against DeepSpeech's flags: a 16 kHz expectation is a one-line error.
    common = [
        "--train_files",
        store,
        "--alphabet_config_path",
        ALPHABET,
        "--n_hidden",
        "32",
        "--train_batch_size",
        "2",
        "--inter_op_parallelism_threads",
        "1",
        "--intra_op_parallelism_threads",
        "1",
        "--loader_threads",
        "1",
    ]
    wrong = run([tool("dstrain"), "train", *common, "--epochs", "1", "--audio_sample_rate", "16000"])
    assert wrong.returncode == 2, wrong.stdout[-2000:]
    assert_says(wrong.stdout, "--audio_sample_rate 16000: ", "preprocessed with --audio_sample_rate 8000")

    work, export = tmp_path / "run", tmp_path / "export"
    out = run(
        horovodrun()
        + [
            tool("dstrain"),
            "train",
            *common,
            "--epochs",
            "12",
            "--learning_rate",
            "0.003",
            "--dropout_rate",
            "0",
            "--audio_sample_rate",
            "8000",
            "--checkpoint_dir",
            str(work),
            "--export_dir",
            str(export),
        ]
    )
    assert out.returncode == 0, out.stdout[-4000:]
    assert records(work, "start")[0]["world_size"] == 2
    digests = final_digests(work)
    assert len(digests) == 2 and digests[0] == digests[1]
    losses = [r["loss"] for r in records(work, "epoch")]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert RunDir(str(work)).read().features == features
    meta = read_export_metadata(str(export))
    assert meta["sample_rate"] == 8000 and FeatureConfig(**meta["features"]) == features

    # The export computes 8 kHz features itself: its audio signature on the 8 kHz samples gives what the model gives
    # on the stored features of that clip, and what dstrain transcribe computes from the file is what was stored.
    model = load_model(str(export))
    assert model.features == features
    np.testing.assert_allclose(log_mel(power_spectrogram(samples, features), features), stored, atol=1e-5)
    from_store = model.log_probs([stored])[0]
    from_audio = model.module.signatures["serving_default"](samples=tf.constant(samples))["log_probs"].numpy()
    np.testing.assert_allclose(from_audio, from_store, atol=1e-3)
    assert np.abs(from_store - from_store.mean(axis=0)).max() > 0.1  # the model says something frame by frame

    # dstrain transcribe at 8 kHz, and a 16 kHz copy of the same clip, which it resamples to the model's 8 kHz.
    wide = tmp_path / "clip-16k.wav"
    subprocess.run(["sox", clip["wav_filename"], "-r", "16000", str(wide)], check=True, timeout=60)
    resampled = read_audio(str(wide), 8000)
    assert soundfile.info(str(wide)).samplerate == 16000 and abs(len(resampled) - len(samples)) <= 2
    n = min(len(resampled), len(samples))
    close = model.log_probs([log_mel(power_spectrogram(x[:n], features), features) for x in (resampled, samples)])
    assert np.abs(np.exp(close[0]) - np.exp(close[1])).mean() < 0.01
    results = tmp_path / "results.csv"
    tr = run(
        [
            tool("dstrain"),
            "transcribe",
            "--model",
            str(export),
            "--audio",
            clip["wav_filename"],
            str(wide),
            "--beam_width",
            "16",
            "--output",
            str(results),
        ]
    )
    assert tr.returncode == 0, tr.stdout[-3000:]
    with open(results, newline="", encoding="utf-8") as f:
        transcripts = [r["transcript"] for r in csv.DictReader(f)]
    # What transcribe computes, in process: the file read at 8 kHz, its features, the export, the beam search.
    expected = [
        ctc_beam_search_decoder(np.exp(p).astype(np.float64), model.alphabet, 16)[0][1]
        for p in model.log_probs([log_mel(power_spectrogram(x, features), features) for x in (samples, resampled)])
    ]
    assert transcripts == expected, (transcripts, expected, clip["transcript"])
