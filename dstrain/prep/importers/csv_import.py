"""Existing DeepSpeech CSVs: paths made absolute (relative ones against the CSV's folder; URLs kept for fsspec),
missing ``wav_filesize`` filled in, transcripts optionally normalised and checked against an alphabet."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec

from dstrain.alphabet import Alphabet
from dstrain.config import option, parse_list
from dstrain.prep.csvfile import read_csv_rows, write_csv
from dstrain.prep.importers.common import ImportReport, write_rejects
from dstrain.prep.importers.text import LabelFilter


@dataclass(frozen=True)
class CsvImportConfig:
    """dstrain import csv: existing DeepSpeech CSVs -> absolute paths, sizes filled in, optional filtering"""

    csv_files: tuple[str, ...] = option(positional=True, parse=parse_list)
    """CSV file(s), comma-separated."""
    output_dir: str = option()
    """Where the rewritten CSVs and import_rejects.csv go."""
    filter_alphabet: str = ""
    """Refuse transcripts with characters outside this alphabet file."""
    normalize: bool = False
    """Apply the English label normalisation."""


def run_csv(cfg: CsvImportConfig) -> int:
    print(import_csv(cfg.csv_files, cfg.output_dir, cfg.filter_alphabet or None, normalise=cfg.normalize).summary())
    return 0


def import_csv(
    csv_files: tuple[str, ...], output_dir: str, filter_alphabet: str | None = None, normalise: bool = False
) -> ImportReport:
    alphabet = Alphabet.from_file(filter_alphabet) if filter_alphabet else None
    label_filter = LabelFilter(alphabet) if normalise else None
    report = ImportReport()
    rejects: list[tuple[str, str, str]] = []
    for csv_file in csv_files:
        rows = []
        for row in read_csv_rows([csv_file]):
            source = row.source if "://" in row.source else os.path.abspath(row.source)
            text = row.transcript
            if label_filter is not None:
                label, reason = label_filter(text)
                if label is None:
                    rejects.append((source, text, reason))
                    report.rejected[reason] += 1
                    continue
                text = label
            elif alphabet is not None and alphabet.missing(text):
                rejects.append((source, text, "alphabet"))
                report.rejected["alphabet"] += 1
                continue
            try:
                size = fsspec.filesystem(fsspec.core.split_protocol(source)[0] or "file").size(source)
            except FileNotFoundError:
                rejects.append((source, text, "missing_file"))
                report.rejected["missing_file"] += 1
                continue
            rows.append((source, size, text))
        out = os.path.join(output_dir, os.path.basename(csv_file))
        write_csv(out, rows)
        report.written[out] = len(rows)
    write_rejects(os.path.join(output_dir, "import_rejects.csv"), rejects)
    return report
