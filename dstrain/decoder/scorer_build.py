"""Building DeepSpeech ``.scorer`` packages: a KenLM binary followed by dstrain's trailer and the vocabulary trie
(the format :mod:`dstrain.decoder.scorer_package` reads, and DeepSpeech's ``generate_scorer_package`` writes).

The trie is the minimal deterministic acceptor of the vocabulary: each word spelled in labels (alphabet index + 1,
or UTF-8 bytes in bytes-output mode) followed by the space label in character mode. A minimal DFA is unique up to
state numbering, so the state and arc counts equal DeepSpeech's for the same words.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass

import numpy as np

from dstrain.alphabet import Alphabet
from dstrain.config import option
from dstrain.decoder.scorer_package import (
    ARC_DTYPE,
    FST_MAGIC,
    STATE_DTYPE,
    TRIE_MAGIC,
    TRIE_VERSION,
    ScorerError,
    read_scorer_package,
)

# OpenFST property bits of an expanded, arc-sorted, epsilon-free, deterministic, acyclic, unweighted acceptor —
# the value DeepSpeech's packages carry for their tries.
_TRIE_PROPERTIES = 0x0000A5AA5A950001
_CONST_FST_ALIGNED_VERSION = 1
_IS_ALIGNED = 4


@dataclass
class BuildReport:
    words: int
    skipped: list[str]
    states: int
    arcs: int


def word_labels(word: str, alphabet: Alphabet | None, utf8: bool) -> list[int] | None:
    """Trie labels of one word; None when a character is outside the alphabet."""
    if utf8:
        return list(word.encode("utf-8"))
    assert alphabet is not None
    if alphabet.missing(word):
        return None
    space = alphabet.space_index
    if space is None:
        raise ScorerError("the alphabet has no space label: needed as the end-of-word marker of the trie")
    return [i + 1 for i in alphabet.encode(word)] + [space + 1]


def minimal_trie(sequences: list[list[int]]) -> tuple[int, list[bool], list[list[tuple[int, int]]]]:
    """(start, final flags, sorted arcs per state) of the minimal DFA accepting exactly ``sequences``."""
    # 1. A plain trie.
    children: list[dict[int, int]] = [{}]
    final = [False]
    for seq in sequences:
        node = 0
        for label in seq:
            nxt = children[node].get(label)
            if nxt is None:
                nxt = len(children)
                children[node][label] = nxt
                children.append({})
                final.append(False)
            node = nxt
        final[node] = True
    # 2. Merge states with the same right language, deepest first (an acyclic DFA minimises bottom-up).
    order, stack = [], [(0, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children[node].values())
    canonical: dict[tuple, int] = {}
    rep = [0] * len(children)
    for node in order:  # children before parents
        signature = (final[node], tuple(sorted((label, rep[c]) for label, c in children[node].items())))
        rep[node] = canonical.setdefault(signature, node)
    # 3. Number the surviving states breadth first from the start.
    number = {rep[0]: 0}
    queue = [rep[0]]
    arcs_out: list[list[tuple[int, int]]] = []
    finals: list[bool] = []
    for node in queue:
        finals.append(final[node])
        row = []
        for label, child in sorted(children[node].items()):
            target = rep[child]
            if target not in number:
                number[target] = len(number)
                queue.append(target)
            row.append((label, number[target]))
        arcs_out.append(row)
    return 0, finals, arcs_out


def _align(buf: bytearray, absolute_start: int) -> None:
    pad = (-(absolute_start + len(buf))) % 16
    buf.extend(b"\0" * pad)


def trailer_bytes(
    lm_bytes: int,
    utf8: bool,
    alpha: float,
    beta: float,
    start: int,
    finals: list[bool],
    arcs: list[list[tuple[int, int]]],
) -> bytes:
    """DeepSpeech's trailer, for a package whose KenLM part is ``lm_bytes`` long (alignment is of absolute offsets)."""
    buf = bytearray()
    buf += (
        TRIE_MAGIC
        + struct.pack("<i", TRIE_VERSION)
        + struct.pack("<B", 1 if utf8 else 0)
        + struct.pack("<dd", alpha, beta)
    )
    n_arcs = sum(len(a) for a in arcs)
    buf += struct.pack("<i", FST_MAGIC)
    for text in (b"const", b"standard"):
        buf += struct.pack("<i", len(text)) + text
    buf += struct.pack("<iiQqqq", _CONST_FST_ALIGNED_VERSION, _IS_ALIGNED, _TRIE_PROPERTIES, start, len(finals), n_arcs)
    _align(buf, lm_bytes)
    states = np.zeros(len(finals), STATE_DTYPE)
    arc_table = np.zeros(n_arcs, ARC_DTYPE)
    pos = 0
    for s, (is_final, row) in enumerate(zip(finals, arcs)):
        states[s] = (0.0 if is_final else np.inf, pos, len(row), 0, 0)
        for label, target in row:
            arc_table[pos] = (label, label, 0.0, target)
            pos += 1
    buf += states.tobytes()
    _align(buf, lm_bytes)
    buf += arc_table.tobytes()
    return bytes(buf)


def build_package(
    lm_path: str,
    vocab_path: str,
    package_path: str,
    alphabet: Alphabet | None,
    alpha: float,
    beta: float,
    utf8: bool = False,
) -> BuildReport:
    """Write ``package_path``: the KenLM binary ``lm_path`` plus the trie of the words in ``vocab_path``."""
    with open(lm_path, "rb") as f:
        head = f.read(64)
    if not head.startswith(b"mmap lm http://kheafield.com/code"):
        raise ScorerError(
            f"{lm_path}: not a KenLM binary model; convert an ARPA file with build_binary (dstrain scorer lm does)"
        )
    if not utf8 and alphabet is None:
        raise ScorerError("an alphabet is needed unless --force_bytes_output_mode")
    with open(vocab_path, encoding="utf-8") as f:
        words = sorted(set(f.read().split()))
    sequences, skipped = [], []
    for word in words:
        labels = word_labels(word, alphabet, utf8)
        if labels is None:
            skipped.append(word)
        else:
            sequences.append(labels)
    if not sequences:
        raise ScorerError(f"{vocab_path}: no word can be spelled with the alphabet")
    start, finals, arcs = minimal_trie(sequences)
    shutil.copyfile(lm_path, package_path)
    lm_bytes = os.path.getsize(package_path)
    with open(package_path, "ab") as f:
        f.write(trailer_bytes(lm_bytes, utf8, alpha, beta, start, finals, arcs))
    read_scorer_package(package_path)  # what was written must read back
    return BuildReport(len(sequences), skipped, len(finals), sum(len(a) for a in arcs))


@dataclass(frozen=True)
class ScorerBuildConfig:
    """dstrain scorer build: KenLM binary + vocabulary -> .scorer (DeepSpeech's generate_scorer_package)"""

    lm: str = option()
    """KenLM binary model (dstrain scorer lm writes one)."""
    vocab: str = option()
    """Words separated by whitespace."""
    package: str = option()
    """The .scorer to write."""
    default_alpha: float = option()
    """Language model weight stored in the package."""
    default_beta: float = option()
    """Word insertion bonus stored in the package."""
    alphabet: str = ""
    """alphabet.txt (not needed with --force_bytes_output_mode)."""
    force_bytes_output_mode: bool = False
    """UTF-8 bytes trie instead of the alphabet."""


def run_build(cfg: ScorerBuildConfig) -> int:
    alphabet = Alphabet.from_file(cfg.alphabet) if cfg.alphabet else None
    report = build_package(
        cfg.lm, cfg.vocab, cfg.package, alphabet, cfg.default_alpha, cfg.default_beta, cfg.force_bytes_output_mode
    )
    print(f"{cfg.package}: {report.words} words, trie of {report.states} states and {report.arcs} arcs")
    if report.skipped:
        print(
            f"{len(report.skipped)} word(s) skipped, characters outside the alphabet: {' '.join(report.skipped[:20])}"
            + (" ..." if len(report.skipped) > 20 else "")
        )
    return 0
