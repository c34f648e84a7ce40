"""LibriSpeech (``SUBSET/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac`` with ``SPEAKER-CHAPTER.trans.txt``).

One CSV per subset folder found (``train-clean-100.csv`` …) in the output folder, with absolute FLAC paths:
soundfile reads FLAC directly, so nothing is converted. Transcripts are lower-cased.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from dstrain.config import option
from dstrain.prep.csvfile import write_csv
from dstrain.prep.importers.common import ImportReport, write_rejects


@dataclass(frozen=True)
class LibriSpeechImportConfig:
    """dstrain import librispeech: LibriSpeech subsets (FLAC + *.trans.txt) -> SUBSET.csv"""

    root: str = option(positional=True)
    """Folder holding the subsets (or one subset folder)."""
    output_dir: str = ""
    """Where the CSVs go; empty: ROOT."""


def run_librispeech(cfg: LibriSpeechImportConfig) -> int:
    print(import_librispeech(cfg.root, cfg.output_dir or None).summary())
    return 0


def import_librispeech(root: str, output_dir: str | None = None) -> ImportReport:
    output_dir = output_dir or root
    transcripts = sorted(glob.glob(os.path.join(root, "**", "*.trans.txt"), recursive=True))
    if not transcripts:
        raise FileNotFoundError(f"{root}: no *.trans.txt files; give the folder that holds LibriSpeech subsets")
    by_subset: dict[str, list[tuple[str, int, str]]] = {}
    rejects: list[tuple[str, str, str]] = []
    report = ImportReport()
    for trans in transcripts:
        chapter_dir = os.path.dirname(trans)
        parts = os.path.relpath(chapter_dir, root).split(os.sep)
        # ROOT/SUBSET/SPEAKER/CHAPTER, or ROOT is itself a subset folder: ROOT/SPEAKER/CHAPTER
        subset = parts[0] if len(parts) >= 3 else os.path.basename(os.path.abspath(root))
        with open(trans, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                utt, _, text = line.partition(" ")
                flac = os.path.abspath(os.path.join(chapter_dir, utt + ".flac"))
                if not text.strip():
                    rejects.append((flac, text, "empty_transcript"))
                    report.rejected["empty_transcript"] += 1
                    continue
                if not os.path.exists(flac):
                    rejects.append((flac, text, "missing_file"))
                    report.rejected["missing_file"] += 1
                    continue
                by_subset.setdefault(subset, []).append((flac, os.path.getsize(flac), text.strip().lower()))
    os.makedirs(output_dir, exist_ok=True)
    for subset, rows in sorted(by_subset.items()):
        out = os.path.join(output_dir, f"{subset}.csv")
        write_csv(out, rows)
        report.written[out] = len(rows)
    write_rejects(os.path.join(output_dir, "import_rejects.csv"), rejects)
    return report
