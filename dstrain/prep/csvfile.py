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
        line = 1
        with f:
            try:
                reader = csv.DictReader(f)
                missing = [c for c in ("wav_filename", "transcript") if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{csv_file}: missing column(s) {missing}; DeepSpeech CSVs have {','.join(CSV_COLUMNS)}")
                for rec in reader:
                    line = reader.line_num
                    path = rec["wav_filename"]
                    if "://" not in path and not os.path.isabs(path):
                        path = os.path.join(base, path) if "://" not in base else f"{base.rstrip('/')}/{path}"
                    yield Row(index, path, rec["transcript"] or "")
                    index += 1
            except UnicodeDecodeError as e:
                # The decoder reads ahead, so the line is the last one read whole, plus one.
                raise ValueError(
                    f"{csv_file}: not UTF-8 near line {line + 1} (byte {e.object[e.start]:#04x}); "
                    "DeepSpeech CSVs are UTF-8: convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None


def write_csv(path: str, rows: list[tuple[str, int, str]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)
