"""Writing importer output: DeepSpeech CSVs plus a reject list of what an importer refused."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ImportReport:
    written: dict[str, int] = field(default_factory=dict)
    """CSV path -> rows."""
    rejected: Counter = field(default_factory=Counter)
    """reason -> count."""

    def summary(self) -> str:
        lines = [f"{path}: {n} rows" for path, n in self.written.items()]
        total = sum(self.rejected.values())
        lines.append(f"{total} refused" + "".join(f", {n} {r}" for r, n in sorted(self.rejected.items())))
        return "\n".join(lines)


def write_rejects(path: str, rejects: list[tuple[str, str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["source", "sentence", "reason"])
        w.writerows(rejects)
