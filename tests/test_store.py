import csv
import json
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DATA, assert_says

from dstrain.alphabet import ctc_min_frames
from dstrain.audio import read_audio
from dstrain.features import FeatureConfig, log_mel, power_spectrogram
from dstrain.prep.importers.ldc93s1 import normalise_transcript
from dstrain.prep.pipeline import PreprocessConfig, preprocess
from dstrain.store import FeatureStore, ShardReader, StoreError, StoreLayout, join

TRANSCRIPT = "she had your dark suit in greasy wash water all year"


def test_ldc93s1_importer_writes_deepspeech_csv(ldc93s1_csv):
    with open(ldc93s1_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["wav_filename", "wav_filesize", "transcript"]
    wav, size, transcript = rows[1]
    assert os.path.isabs(wav) and int(size) == os.path.getsize(wav) == 93638
    assert transcript == TRANSCRIPT
    assert normalise_transcript("0 46797 She had your dark suit in greasy wash water all year.\n") == TRANSCRIPT


def test_store_layout_manifest_and_checksums(ldc93s1_store):
    m = FeatureStore.open(ldc93s1_store).manifest
    assert m.utterances == 1 and len(m.shards) == 1
    assert abs(m.hours * 3600 - 46797 / 16000) < 0.01
    assert m.rejects == {"count": 0, "by_reason": {}}
    shard = m.shards[0]
    assert StoreLayout(ldc93s1_store).sha256(shard.path) == shard.sha256
    assert os.path.getsize(join(ldc93s1_store, shard.path)) == shard.bytes
    manifest = json.load(open(join(ldc93s1_store, "_manifest.json")))
    assert manifest["totals"]["utterances"] == 1 and manifest["schema_version"] == 1
    # Plain pyarrow and pandas open the shards; stored features are TF's log mel filterbank.
    table = pq.read_table(join(ldc93s1_store, shard.path))
    assert table.column("transcript").to_pylist() == [TRANSCRIPT]
    import pandas

    frame = pandas.read_parquet(join(ldc93s1_store, shard.path))
    assert frame["n_frames"].tolist() == [145] and len(frame["features"][0]) == 145 * 40
    (u,) = ShardReader(join(ldc93s1_store, shard.path), 40).utterances()
    cfg = FeatureConfig()
    expected = log_mel(power_spectrogram(read_audio(str(DATA / "LDC93S1.wav")), cfg), cfg)
    np.testing.assert_array_equal(u.features, expected)
    assert m.get_alphabet().decode(u.labels) == TRANSCRIPT


def test_memory_filesystem_round_trip(ldc93s1_csv, alphabet_path):
    url = "memory://dstrain-test/store"
    m = preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=url), progress=False)
    again = FeatureStore.open(url)
    assert again.manifest.shards == m.shards
    (u,) = again.reader(0).utterances()
    assert u.transcript == TRANSCRIPT
    assert fsspec.filesystem("memory").exists("/dstrain-test/store/_manifest.json")


def test_remote_audio_and_csv_through_fsspec(tmp_path, alphabet_path):
    from dstrain.prep.importers.csv_import import import_csv

    mem = fsspec.filesystem("memory")
    mem.pipe("/remote/audio/a.wav", (DATA / "LDC93S1.wav").read_bytes())
    mem.pipe("/remote/list.csv", f"wav_filename,wav_filesize,transcript\naudio/a.wav,0,{TRANSCRIPT}\n".encode())
    report = import_csv(("memory://remote/list.csv",), str(tmp_path))
    (row,) = list(csv.DictReader(open(tmp_path / "list.csv")))
    assert row["wav_filename"] == "memory://remote/audio/a.wav" and int(row["wav_filesize"]) == 93638
    m = preprocess(
        PreprocessConfig(
            csv_files=("memory://remote/list.csv",), alphabet_path=alphabet_path, output=str(tmp_path / "s")
        ),
        progress=False,
    )
    assert m.utterances == 1 and report.rejected == {}


def test_existing_store_needs_overwrite(ldc93s1_csv, alphabet_path, tmp_path):
    cfg = PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(tmp_path / "s"))
    preprocess(cfg, progress=False)
    with pytest.raises(StoreError, match="--overwrite"):
        preprocess(cfg, progress=False)


def test_bad_samples_are_rejected_with_reasons(tmp_path, ldc93s1_csv, alphabet_path):
    wav = open(ldc93s1_csv).read().splitlines()[1].split(",")[0]
    (tmp_path / "garbage.wav").write_bytes(b"not a wav file at all")
    import soundfile

    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(0, np.int16), 16000)
    rows = [
        (wav, TRANSCRIPT),  # good
        (wav, "she had your dark suit in greasy wash water all year!"),  # '!' not in alphabet
        ("missing.wav", "hello"),
        ("garbage.wav", "hello"),
        (wav, " "),
        (wav, "x" * 200),  # 145 frames cannot carry 200 labels
        ("empty.wav", "hello"),
    ]
    csv_path = tmp_path / "bad.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["wav_filename", "wav_filesize", "transcript"])
        for path, text in rows:
            w.writerow([path, 0, text])
    out = tmp_path / "store"
    m = preprocess(
        PreprocessConfig(csv_files=(str(csv_path),), alphabet_path=alphabet_path, output=str(out), max_duration=0),
        progress=False,
    )
    assert m.utterances == 1
    assert m.rejects["by_reason"] == {
        "alphabet": 1,
        "empty_audio": 1,
        "empty_transcript": 1,
        "missing_file": 1,
        "too_short": 1,
        "unreadable_audio": 1,
    }
    with open(out / "_rejects.csv", newline="") as f:
        rejects = list(csv.DictReader(f))
    assert len(rejects) == 6
    assert any(r["reason"] == "alphabet" and "'!'" in r["detail"] for r in rejects)
    # Too long
    m = preprocess(
        PreprocessConfig(
            csv_files=(str(csv_path),), alphabet_path=alphabet_path, output=str(tmp_path / "s2"), max_duration=1.0
        ),
        progress=False,
    )
    assert m.utterances == 0 and m.rejects["by_reason"]["too_long"] == 2  # the good and the too-short one


def test_ctc_min_frames_counts_repeats():
    assert ctc_min_frames([1, 2, 3]) == 3
    assert ctc_min_frames([1, 1, 2, 2, 2]) == 8
    assert ctc_min_frames([]) == 0


def test_workers_give_identical_store(ldc93s1_csv, alphabet_path, tmp_path):
    csv_path = tmp_path / "many.csv"
    line = open(ldc93s1_csv).read().splitlines()[1]
    csv_path.write_text("wav_filename,wav_filesize,transcript\n" + "\n".join([line] * 5) + "\n")
    a = preprocess(
        PreprocessConfig(
            csv_files=(str(csv_path),),
            alphabet_path=alphabet_path,
            output=str(tmp_path / "a"),
            shard_size_mb=0.05,
            chunk_rows=2,
        ),
        progress=False,
    )
    b = preprocess(
        PreprocessConfig(
            csv_files=(str(csv_path),),
            alphabet_path=alphabet_path,
            output=str(tmp_path / "b"),
            shard_size_mb=0.05,
            chunk_rows=2,
            workers=2,
        ),
        progress=False,
    )
    assert len(a.shards) == 3  # 5 rows in chunks of 2
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / "_manifest.json").read_text() == (tmp_path / "b" / "_manifest.json").read_text()


def test_shards_info_reports_totals_and_catches_corruption(ldc93s1_csv, alphabet_path, tmp_path, capsys):
    from dstrain.cli import main

    out = tmp_path / "s"
    preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(out)), progress=False)
    with pytest.raises(SystemExit) as e:
        main(["shards", "info", str(out)])
    text = capsys.readouterr().out
    assert e.value.code == 0
    assert_says(text, "utterances 1", "all shards OK")
    shard = next(out.glob("shard-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main(["shards", "info", str(out)])
    assert e.value.code == 1
    assert_says(capsys.readouterr().out, "differs from the manifest")


def test_store_folder_opens_as_one_parquet_dataset(ldc93s1_csv, alphabet_path, tmp_path):
    import pandas
    import pyarrow.dataset as ds

    csv_path = tmp_path / "five.csv"
    line = open(ldc93s1_csv).read().splitlines()[1]
    csv_path.write_text("wav_filename,wav_filesize,transcript\n" + "\n".join([line] * 5) + "\nmissing.wav,0,x\n")
    out = tmp_path / "store"
    m = preprocess(
        PreprocessConfig(csv_files=(str(csv_path),), alphabet_path=alphabet_path, output=str(out), chunk_rows=2),
        progress=False,
    )
    assert len(m.shards) == 3 and m.rejects["count"] == 1 and (out / "_rejects.csv").exists()
    frame = pandas.read_parquet(out)
    assert len(frame) == m.utterances == 5 and set(frame["transcript"]) == {TRANSCRIPT}
    assert ds.dataset(str(out)).count_rows() == 5


def test_stores_of_the_old_layout_still_open(ldc93s1_csv, alphabet_path, tmp_path):
    out = tmp_path / "old"
    preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(out)), progress=False)
    (out / "_manifest.json").rename(out / "manifest.json")
    store = FeatureStore.open(str(out))
    assert store.manifest.utterances == 1 and store.verify() == []
    with pytest.raises(StoreError, match="already holds a finished store"):
        preprocess(
            PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(out)), progress=False
        )


def test_truncated_shard_is_named_with_the_fix(ldc93s1_csv, alphabet_path, tmp_path):
    out = tmp_path / "s"
    preprocess(PreprocessConfig(csv_files=(ldc93s1_csv,), alphabet_path=alphabet_path, output=str(out)), progress=False)
    shard = next(out.glob("shard-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-200])
    store = FeatureStore.open(str(out))
    (problem,) = store.verify(checksums=False)
    assert shard.name in problem and "truncated" in problem
    with pytest.raises(StoreError, match=f"{shard.name}.*dstrain shards info"):
        list(store.reader(0).utterances())


def test_metadata_is_replaced_whole_and_a_damaged_manifest_says_what_to_do(ldc93s1_store, tmp_path, monkeypatch):
    import shutil

    store = str(tmp_path / "s")
    shutil.copytree(ldc93s1_store, store)
    layout = StoreLayout(store)
    before = open(join(store, "_manifest.json"), "rb").read()
    # A failure inside the write (a full disk, a kill) leaves the old manifest whole, and no temporary file.
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        layout.write_atomic("_manifest.json", "{}")
    monkeypatch.undo()
    assert open(join(store, "_manifest.json"), "rb").read() == before
    assert sorted(n for n in os.listdir(store) if ".tmp-" in n) == []
    # One written by something else, or cut by a disk: a StoreError naming the file and the fix, not a JSONDecodeError.
    open(join(store, "_manifest.json"), "wb").write(before[: len(before) // 2])
    with pytest.raises(StoreError) as e:
        FeatureStore.open(store)
    assert_says(str(e.value), "_manifest.json: damaged manifest", "dstrain preprocess --overwrite")
