"""Word and character error rates, corpus-level as DeepSpeech reports them."""
from __future__ import annotations

from typing import Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (unit costs) between two sequences."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def error_rates(pairs: Sequence[tuple[str, str]]) -> tuple[float, float]:
    """(WER, CER) over (reference, hypothesis) pairs: total edits / total reference length."""
    word_edits = sum(edit_distance(r.split(), h.split()) for r, h in pairs)
    words = sum(len(r.split()) for r, _ in pairs)
    char_edits = sum(edit_distance(r, h) for r, h in pairs)
    chars = sum(len(r) for r, _ in pairs)
    return word_edits / max(words, 1), char_edits / max(chars, 1)
