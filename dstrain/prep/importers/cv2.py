"""Common Voice releases (DeepSpeech's bin/import_cv2.py): ``train.tsv``, ``dev.tsv``, ``test.tsv``, ``clips/*.mp3``.

Clips are referenced as they are (MP3, read directly by soundfile at preprocessing); ``--wav`` converts them to
16 kHz mono WAV beside the MP3s for tools that need WAV. CSVs go into ``clips/`` with paths relative to it, as
DeepSpeech writes them. Sentences the label filter refuses are listed in ``clips/import_rejects.csv``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import soundfile

from dstrain.alphabet import Alphabet
from dstrain.audio import AudioError, read_audio
from dstrain.config import option
from dstrain.prep.csvfile import write_csv
from dstrain.prep.importers.common import ImportReport, write_rejects
from dstrain.prep.importers.text import LabelFilter

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Cv2ImportConfig:
    """dstrain import cv2: a Common Voice release -> clips/{train,dev,test}.csv"""

    language_dir: str = option(positional=True)
    """The extracted language folder (holds clips/ and the .tsv files)."""
    filter_alphabet: str = ""
    """Refuse sentences with characters outside this alphabet file."""
    wav: bool = False
    """Also convert clips to 16 kHz WAV and reference those."""
    normalize: bool = False
    """NFKD-normalise sentences and keep ASCII only."""


def run_cv2(cfg: Cv2ImportConfig) -> int:
    print(import_cv2(cfg.language_dir, cfg.filter_alphabet or None, wav=cfg.wav, ascii_only=cfg.normalize).summary())
    return 0


def import_cv2(
    language_dir: str,
    filter_alphabet: str | None = None,
    wav: bool = False,
    ascii_only: bool = False,
    splits: tuple[str, ...] = SPLITS,
) -> ImportReport:
    clips = os.path.join(language_dir, "clips")
    if not os.path.isdir(clips):
        raise FileNotFoundError(f"{language_dir}: no clips/ folder; give the extracted Common Voice language folder")
    label_filter = LabelFilter(Alphabet.from_file(filter_alphabet) if filter_alphabet else None, ascii_only)
    report = ImportReport()
    rejects: list[tuple[str, str, str]] = []
    for split in splits:
        tsv = os.path.join(language_dir, f"{split}.tsv")
        if not os.path.exists(tsv):
            raise FileNotFoundError(
                f"{tsv} is missing: a Common Voice release has {', '.join(s + '.tsv' for s in splits)}"
            )
        rows = []
        with open(tsv, encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                mp3 = os.path.join(clips, rec["path"])
                label, reason = label_filter(rec["sentence"] or "")
                if label is None:
                    rejects.append((mp3, rec["sentence"], reason))
                    report.rejected[reason] += 1
                    continue
                if not os.path.exists(mp3):
                    rejects.append((mp3, rec["sentence"], "missing_file"))
                    report.rejected["missing_file"] += 1
                    continue
                name = rec["path"]
                if wav:
                    name = os.path.splitext(name)[0] + ".wav"
                    target = os.path.join(clips, name)
                    if not os.path.exists(target):
                        try:
                            soundfile.write(target, read_audio(mp3), 16000, subtype="PCM_16")
                        except AudioError as e:
                            rejects.append((mp3, rec["sentence"], f"unreadable_audio: {e}"))
                            report.rejected["unreadable_audio"] += 1
                            continue
                rows.append((name, os.path.getsize(os.path.join(clips, name)), label))
        out = os.path.join(clips, f"{split}.csv")
        write_csv(out, rows)
        report.written[out] = len(rows)
    write_rejects(os.path.join(clips, "import_rejects.csv"), rejects)
    return report
