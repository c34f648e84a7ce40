import csv
import os
import shutil
import subprocess
import sys

import pytest
import soundfile
from conftest import DATA, SHARED

from dstrain.prep.importers.csv_import import import_csv
from dstrain.prep.importers.cv2 import import_cv2
from dstrain.prep.importers.librispeech import import_librispeech
from dstrain.prep.importers.text import normalise_english
from dstrain.prep.pipeline import PreprocessConfig, preprocess

SYNTH = SHARED / "tools" / "synth_cv_corpus.py"


def rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def cv_corpus(tmp_path_factory) -> str:
    """A real Common Voice-layout corpus: TTS speech as 48 kHz MP3, made by the shared tool."""
    if not SYNTH.exists():
        pytest.skip("../shared/tools/synth_cv_corpus.py not present")
    for exe in ("espeak-ng", "sox", "lame"):
        if not shutil.which(exe):
            pytest.fail(f"{exe} missing: tools/install.sh installs espeak-ng, sox and lame")
    out = tmp_path_factory.mktemp("cv") / "en"
    subprocess.run(
        [
            sys.executable,
            str(SYNTH),
            "--sentences",
            str(SHARED / "data" / "smoke" / "vocab.txt"),
            "--out",
            str(out),
            "--clips",
            "24",
            "--max-words",
            "5",
            "--jobs",
            "2",
            "--seed",
            "7",
        ],
        check=True,
        capture_output=True,
    )
    # Sentences DeepSpeech's importer refuses or cleans: digits, a character outside the alphabet, punctuation.
    clip = sorted(os.listdir(out / "clips"))[0]
    with open(out / "train.tsv", "a", encoding="utf-8") as f:
        f.write(f"x\t{clip}\tRoom 101 is here\t2\t0\t\t\t\n")
        f.write(f"x\t{clip}\tthe café is open\t2\t0\t\t\t\n")
        f.write(f"x\t{clip}\tWell-known, isn't it?\t2\t0\t\t\t\n")
        f.write("x\tnot_there.mp3\thello\t2\t0\t\t\t\n")
    return str(out)


def test_normalise_english_as_deepspeech():
    assert normalise_english("Well-known, isn't it?") == "well known isn't it"
    assert normalise_english("Room 101") is None and normalise_english("[noise]") is None
    assert normalise_english("  ...  ") is None
    assert normalise_english("café", ascii_only=True) == "cafe"


def test_cv2_importer(cv_corpus, alphabet_path):
    report = import_cv2(cv_corpus, filter_alphabet=alphabet_path)
    clips = os.path.join(cv_corpus, "clips")
    n_tsv = {s: sum(1 for _ in open(os.path.join(cv_corpus, f"{s}.tsv"))) - 1 for s in ("train", "dev", "test")}
    train = rows(os.path.join(clips, "train.csv"))
    assert len(train) == n_tsv["train"] - 3  # digits, café, missing clip refused; the hyphenated one cleaned
    assert report.rejected == {"unusable_sentence": 1, "alphabet": 1, "missing_file": 1}
    assert "well known isn't it" in [r["transcript"] for r in train]
    assert len(rows(os.path.join(clips, "dev.csv"))) == n_tsv["dev"]
    first = train[0]
    assert first["wav_filename"].endswith(".mp3") and not os.path.isabs(first["wav_filename"])
    assert int(first["wav_filesize"]) == os.path.getsize(os.path.join(clips, first["wav_filename"]))
    refused = rows(os.path.join(clips, "import_rejects.csv"))
    assert sorted(r["reason"] for r in refused) == ["alphabet", "missing_file", "unusable_sentence"]

    # MP3s go straight into the store (48 kHz -> 16 kHz), no WAV copies.
    m = preprocess(
        PreprocessConfig(
            csv_files=(os.path.join(clips, "train.csv"),),
            alphabet_path=alphabet_path,
            output=os.path.join(cv_corpus, "store"),
            chunk_rows=8,
        ),
        progress=False,
    )
    assert m.utterances + m.rejects["count"] == len(train)
    assert m.utterances >= len(train) - 1 and m.hours > 0


def test_cv2_importer_wav_option(cv_corpus, tmp_path):
    copy = tmp_path / "cv"
    shutil.copytree(cv_corpus, copy, ignore=shutil.ignore_patterns("store"))
    import_cv2(str(copy), wav=True, splits=("dev",))
    (first, *_) = rows(copy / "clips" / "dev.csv")
    info = soundfile.info(str(copy / "clips" / first["wav_filename"]))
    assert first["wav_filename"].endswith(".wav") and info.samplerate == 16000 and info.channels == 1


def test_librispeech_importer(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "1272" / "128104"
    chapter.mkdir(parents=True)
    audio, rate = soundfile.read(str(DATA / "LDC93S1.wav"))
    soundfile.write(str(chapter / "1272-128104-0000.flac"), audio, rate)
    soundfile.write(str(chapter / "1272-128104-0001.flac"), audio[:rate], rate)
    (chapter / "1272-128104.trans.txt").write_text(
        "1272-128104-0000 SHE HAD YOUR DARK SUIT IN GREASY WASH WATER ALL YEAR\n"
        "1272-128104-0001 SHE HAD\n"
        "1272-128104-0002 THIS FILE IS MISSING\n"
    )
    report = import_librispeech(str(tmp_path / "LibriSpeech"), str(tmp_path / "csv"))
    (out,) = rows(tmp_path / "csv" / "dev-clean.csv")[:1]
    assert out["transcript"] == "she had your dark suit in greasy wash water all year"
    assert out["wav_filename"].endswith(".flac") and os.path.isabs(out["wav_filename"])
    assert report.written == {str(tmp_path / "csv" / "dev-clean.csv"): 2} and report.rejected == {"missing_file": 1}


def test_csv_importer_resolves_paths_and_fills_sizes(tmp_path, alphabet_path):
    (tmp_path / "audio").mkdir()
    shutil.copy(DATA / "LDC93S1.wav", tmp_path / "audio" / "a.wav")
    src = tmp_path / "in.csv"
    src.write_text("wav_filename,wav_filesize,transcript\naudio/a.wav,,she had\naudio/a.wav,0,Ça va\nnope.wav,1,x\n")
    report = import_csv((str(src),), str(tmp_path / "out"), filter_alphabet=alphabet_path)
    (row,) = rows(tmp_path / "out" / "in.csv")
    assert row["wav_filename"] == str(tmp_path / "audio" / "a.wav") and int(row["wav_filesize"]) == 93638
    assert report.rejected == {"alphabet": 1, "missing_file": 1}
