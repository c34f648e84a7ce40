"""DeepSpeech ``alphabet.txt``: one label per line, UTF-8.

Rules, as DeepSpeech's ``Alphabet::init``:
- a line starting with ``#`` is a comment; ``\\#`` alone is the label ``#``;
- a line holding a single space is the space label;
- empty lines are skipped; the order of the remaining lines gives label indices 0..N-1.

The CTC blank is not in the file: models output ``len(alphabet) + 1`` classes with the blank last.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import fsspec


class AlphabetError(ValueError):
    """A transcript cannot be encoded, or an alphabet file is malformed."""


@dataclass(frozen=True)
class Alphabet:
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise AlphabetError("alphabet has no labels")
        seen: dict[str, int] = {}
        for i, label in enumerate(self.labels):
            if label in seen:
                raise AlphabetError(f"label {label!r} appears twice (lines for labels {seen[label]} and {i})")
            seen[label] = i
        object.__setattr__(self, "_index", seen)

    @classmethod
    def from_text(cls, text: str) -> "Alphabet":
        labels = []
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if line == "\\#":
                line = "#"
            elif line.startswith("#"):
                continue
            if line == "":
                continue
            labels.append(line)
        return cls(tuple(labels))

    @classmethod
    def from_file(cls, path: str) -> "Alphabet":
        try:
            with fsspec.open(path, "rt", encoding="utf-8", newline="") as f:
                text = f.read()
        except FileNotFoundError as e:
            raise AlphabetError(f"alphabet file not found: {path} (--alphabet_config_path)") from e
        return cls.from_text(text)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def blank_index(self) -> int:
        return len(self.labels)

    @property
    def space_index(self) -> int | None:
        return self._index.get(" ")  # type: ignore[attr-defined]

    def missing(self, transcript: str) -> list[str]:
        """Characters of ``transcript`` that have no label, in first-seen order."""
        index = self._index  # type: ignore[attr-defined]
        out: list[str] = []
        for ch in transcript:
            if ch not in index and ch not in out:
                out.append(ch)
        return out

    def encode(self, transcript: str) -> list[int]:
        index = self._index  # type: ignore[attr-defined]
        try:
            return [index[ch] for ch in transcript]
        except KeyError:
            missing = ", ".join(repr(c) for c in self.missing(transcript))
            raise AlphabetError(
                f"alphabet cannot encode transcript {transcript!r}: missing characters {missing}; "
                "add them to the alphabet file or filter the corpus"
            ) from None

    def decode(self, labels: Iterable[int]) -> str:
        return "".join(self.labels[i] for i in labels)

    def label_bytes(self) -> list[bytes]:
        """Labels as the UTF-8 bytes the compiled decoder builds words from."""
        return [label.encode("utf-8") for label in self.labels]

    def serialize(self) -> str:
        """The alphabet as a DeepSpeech alphabet file."""
        lines = ["\\#" if label == "#" else label for label in self.labels]
        return "\n".join(lines) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.serialize().encode("utf-8")).hexdigest()


def ctc_min_frames(labels: Sequence[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between repeats (fewer: infinite loss)."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


def greedy_decode(best_path: Sequence[int], alphabet: Alphabet) -> str:
    """CTC best-path decoding: collapse repeats, then drop blanks."""
    out: list[int] = []
    previous = -1
    for label in best_path:
        label = int(label)
        if label != previous and label != alphabet.blank_index:
            out.append(label)
        previous = label
    return alphabet.decode(out)


class UTF8Alphabet:
    """DeepSpeech's bytes-output alphabet: labels 0..254 are the bytes 1..255 of the UTF-8 transcript, so any
    language fits in 255 outputs (+ blank). Decoding joins the bytes and reads them as UTF-8."""

    labels: tuple[str, ...] = tuple(chr(b) for b in range(1, 256))  # one label per byte value, as latin-1 text

    def __len__(self) -> int:
        return 255

    @property
    def blank_index(self) -> int:
        return 255

    @property
    def space_index(self) -> int:
        return ord(" ") - 1

    def missing(self, transcript: str) -> list[str]:
        return ["\0"] if "\0" in transcript else []

    def encode(self, transcript: str) -> list[int]:
        if "\0" in transcript:
            raise AlphabetError(f"transcript {transcript!r} holds a NUL byte, which has no label")
        return [b - 1 for b in transcript.encode("utf-8")]

    def decode(self, labels: Iterable[int]) -> str:
        return bytes(int(i) + 1 for i in labels).decode("utf-8", errors="replace")

    def label_bytes(self) -> list[bytes]:
        return [bytes([i + 1]) for i in range(255)]

    def sha256(self) -> str:
        """Identifies bytes mode in store manifests and runs, as :meth:`Alphabet.sha256` identifies an alphabet."""
        return hashlib.sha256(b"dstrain UTF-8 bytes output mode").hexdigest()
