"""DeepSpeech's CSV format (``wav_filename,wav_filesize,transcript``): what importers write and preprocessing reads."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import fsspec

CSV_COLUMNS = ("wav_filename", "wav_filesize", "transcript")


@dataclass(frozen=True)
class Row:
    index: int
    """Position over all input CSVs, in order: the utterance id in the store."""
    source: str
    transcript: str


def read_csv_rows(csv_files: Iterable[str]) -> Iterator[Row]:
    """Rows of DeepSpeech CSVs; relative audio paths resolve against each CSV's folder, URLs stay URLs."""
    index = 0
    for csv_file in csv_files:
        base = os.path.dirname(csv_file)
        try:
            f = fsspec.open(csv_file, "rt", encoding="utf-8", newline="").open()
        except FileNotFoundError:
            raise FileNotFoundError(f"CSV not found: {csv_file}") from None
        with f:
            try:
                reader = csv.DictReader(f)
                missing = [c for c in ("wav_filename", "transcript") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(
                        f"{csv_file}: missing column(s) {missing}; DeepSpeech CSVs have {','.join(CSV_COLUMNS)}"
                    )
                for rec in reader:
                    path = rec["wav_filename"]
                    if "://" not in path and not os.path.isabs(path):
                        path = os.path.join(base, path) if "://" not in base else f"{base.rstrip('/')}/{path}"
                    yield Row(index, path, rec["transcript"] or "")
                    index += 1
            except UnicodeDecodeError:
                raise ValueError(_not_utf8(csv_file)) from None


def _not_utf8(csv_file: str) -> str:
    """The first line that is not UTF-8 (the decoder reads ahead, so the reader's own line count is no help)."""
    with fsspec.open(csv_file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{csv_file} line {number}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "DeepSpeech CSVs are UTF-8: convert the file, e.g. iconv -f latin1 -t utf-8"
                )
    return f"{csv_file}: not UTF-8"


def write_csv(path: str, rows: list[tuple[str, int, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
