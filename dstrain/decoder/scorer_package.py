"""Reading DeepSpeech ``.scorer`` packages.

A package is a KenLM binary followed, at KenLM's end-of-search offset, by DeepSpeech's trailer::

    int32   magic 'TRIE' (bytes "EIRT", little-endian)
    int32   version (6)
    uint8   UTF-8 mode flag
    float64 default alpha, float64 default beta
    OpenFST ConstFst<StdArc> (the vocabulary trie), written aligned:
        FstHeader: int32 magic 2125659606, string fst_type "const", string arc_type "standard",
                   int32 version, int32 flags (4 = aligned), uint64 properties,
                   int64 start, int64 num_states, int64 num_arcs     (strings: int32 length + bytes)
        padding to a 16-byte boundary of the absolute file offset
        num_states x {float32 final, uint32 arc position, uint32 arc count, uint32 n_iepsilons, uint32 n_oepsilons}
        padding to 16 bytes
        num_arcs   x {int32 ilabel, int32 olabel, float32 weight, int32 nextstate}

Trie labels are alphabet index + 1 (byte value in UTF-8 mode); a word is a path from the start state to a final
state (final weight 0; non-final states carry +inf).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np

TRIE_MAGIC = b"EIRT"
TRIE_VERSION = 6
FST_MAGIC = 2125659606
_ALIGN = 16
STATE_DTYPE = np.dtype(
    [("final", "<f4"), ("pos", "<u4"), ("narcs", "<u4"), ("niepsilons", "<u4"), ("noepsilons", "<u4")]
)
ARC_DTYPE = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4"), ("nextstate", "<i4")])


class ScorerError(ValueError):
    """A file that is not a usable DeepSpeech scorer package."""


@dataclass(frozen=True)
class ConstFst:
    start: int
    states: np.ndarray  # STATE_DTYPE
    arcs: np.ndarray  # ARC_DTYPE, grouped by source state, sorted by ilabel within each

    def is_final(self, state: int) -> bool:
        return bool(np.isfinite(self.states["final"][state]))

    def arcs_of(self, state: int) -> np.ndarray:
        s = self.states[state]
        return self.arcs[int(s["pos"]) : int(s["pos"]) + int(s["narcs"])]

    def paths(self) -> Iterator[list[int]]:
        """Every label sequence from the start state to a final state, depth first in label order."""
        stack: list[tuple[int, list[int]]] = [(self.start, [])]
        while stack:
            state, labels = stack.pop()
            if self.is_final(state):
                yield labels
            for arc in reversed(self.arcs_of(state)):
                stack.append((int(arc["nextstate"]), labels + [int(arc["ilabel"])]))


@dataclass(frozen=True)
class ScorerPackage:
    path: str
    lm_bytes: int
    """Length of the KenLM part: the trailer starts here."""
    utf8: bool
    alpha: float
    beta: float
    fst: ConstFst


def _read_string(data: bytes, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<i", data, off)
    if not 0 <= n < 256:
        raise ScorerError("bad FST header string")
    return data[off + 4 : off + 4 + n].decode("ascii", "replace"), off + 4 + n


def _align(off: int) -> int:
    return -(-off // _ALIGN) * _ALIGN


def parse_trailer(data: bytes, offset: int, path: str = "scorer") -> ScorerPackage:
    """Parse the DeepSpeech trailer that starts at ``offset``; it must run exactly to the end of ``data``."""
    if data[offset : offset + 4] != TRIE_MAGIC:
        raise ScorerError(f"{path}: no DeepSpeech trie at byte {offset}")
    (version,) = struct.unpack_from("<i", data, offset + 4)
    if version != TRIE_VERSION:
        raise ScorerError(
            f"{path}: trie version {version}, expected {TRIE_VERSION}; rebuild the package with "
            "dstrain scorer build (DeepSpeech 0.9's generate_scorer_package writes version 6)"
        )
    utf8 = data[offset + 8] != 0
    alpha, beta = struct.unpack_from("<dd", data, offset + 9)
    off = offset + 25
    (magic,) = struct.unpack_from("<i", data, off)
    if magic != FST_MAGIC:
        raise ScorerError(f"{path}: trie header is not an OpenFST file (magic {magic})")
    fst_type, off = _read_string(data, off + 4)
    arc_type, off = _read_string(data, off)
    if (fst_type, arc_type) != ("const", "standard"):
        raise ScorerError(f"{path}: trie is a {fst_type}/{arc_type} FST, expected const/standard")
    _fst_version, flags, _properties, start, n_states, n_arcs = struct.unpack_from("<iiQqqq", data, off)
    off += 4 + 4 + 8 + 8 + 8 + 8
    aligned = bool(flags & 4)
    if aligned:
        off = _align(off)
    states = np.frombuffer(data, STATE_DTYPE, n_states, off)
    off += n_states * STATE_DTYPE.itemsize
    if aligned:
        off = _align(off)
    arcs = np.frombuffer(data, ARC_DTYPE, n_arcs, off)
    off += n_arcs * ARC_DTYPE.itemsize
    if off != len(data):
        raise ScorerError(f"{path}: {len(data) - off} unexpected byte(s) after the trie")
    if not (0 <= start < max(n_states, 1)) or (n_arcs and int(arcs["nextstate"].max()) >= n_states):
        raise ScorerError(f"{path}: trie refers to states that do not exist")
    return ScorerPackage(
        path, offset, utf8, float(alpha), float(beta), ConstFst(int(start), states.copy(), arcs.copy())
    )


def read_scorer_package(path: str) -> ScorerPackage:
    """The trailer of a ``.scorer``; the KenLM part is ``data[:lm_bytes]`` (the kenlm package opens the file as is)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ScorerError(f"scorer file not found: {path} (--scorer_path)") from None
    if not data.startswith(b"mmap lm http://kheafield.com/code"):
        raise ScorerError(f"{path}: not a DeepSpeech scorer (it does not start with a KenLM binary model)")
    # KenLM's end-of-search offset needs KenLM's C++ to compute; the trailer is instead found by parsing each
    # candidate magic from the end: only the real one parses exactly to the end of the file.
    candidates = []
    at = data.rfind(TRIE_MAGIC)
    while at >= 0:
        candidates.append(at)
        at = data.rfind(TRIE_MAGIC, 0, at)
    first_error: ScorerError | None = None
    for at in candidates:
        try:
            return parse_trailer(data, at, path)
        except (ScorerError, struct.error, ValueError) as e:
            if isinstance(e, ScorerError) and "version" in str(e):
                raise
            first_error = first_error or ScorerError(str(e))
    raise ScorerError(
        f"{path}: KenLM model without a DeepSpeech trie; package it with dstrain scorer build"
        + (f" ({first_error})" if first_error else "")
    )


def vocabulary(package: ScorerPackage, labels: tuple[str, ...] | None = None) -> list[str]:
    """The words in the trie: labels mapped through the alphabet (index + 1), or bytes in UTF-8 mode.

    In character mode each word ends with the space label, DeepSpeech's end-of-word marker; it is stripped here.
    """
    words = []
    for path in package.fst.paths():
        if not package.utf8 and path and labels is not None and labels[path[-1] - 1] == " ":
            path = path[:-1]
        if package.utf8:
            words.append(bytes(path).decode("utf-8", "replace"))
        else:
            if labels is None:
                raise ValueError("an alphabet is needed to spell a non-UTF-8 trie")
            words.append("".join(labels[i - 1] for i in path))
    return words
