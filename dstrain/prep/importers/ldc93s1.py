"""LDC93S1, the one-utterance TIMIT sample DeepSpeech trains on first (bin/import_ldc93s1.py)."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass
from importlib import resources

from dstrain.config import option


@dataclass(frozen=True)
class Ldc93s1ImportConfig:
    """dstrain import ldc93s1: the bundled LDC93S1 sample -> TARGET_DIR/ldc93s1.csv"""

    target_dir: str = option(positional=True)
    """Folder to copy the sample and write the CSV into."""


def run_ldc93s1(cfg: Ldc93s1ImportConfig) -> int:
    print(import_ldc93s1(cfg.target_dir))
    return 0


def normalise_transcript(line: str) -> str:
    """``0 46797 She had ... year.`` -> ``she had ... year``, exactly as DeepSpeech's importer."""
    return " ".join(line.strip().lower().split(" ")[2:]).replace(".", "")


def import_ldc93s1(target_dir: str) -> str:
    """Copy the bundled sample into ``target_dir`` and write ``ldc93s1.csv``; returns the CSV path."""
    os.makedirs(target_dir, exist_ok=True)
    data = resources.files("dstrain") / "data"
    wav = os.path.join(target_dir, "LDC93S1.wav")
    with resources.as_file(data / "LDC93S1.wav") as src:
        shutil.copyfile(src, wav)
    transcript = normalise_transcript((data / "LDC93S1.txt").read_text(encoding="utf-8"))
    csv_path = os.path.join(target_dir, "ldc93s1.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["wav_filename", "wav_filesize", "transcript"])
        w.writerow([os.path.abspath(wav), os.path.getsize(wav), transcript])
    return csv_path
