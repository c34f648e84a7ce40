"""Word and character error rates, corpus-level as DeepSpeech reports them; edit distances by rapidfuzz (C++)."""

from __future__ import annotations

from typing import Sequence

from rapidfuzz.distance import Levenshtein


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (unit costs) between two strings or two sequences of words."""
    return Levenshtein.distance(ref, hyp)


def error_rates(pairs: Sequence[tuple[str, str]]) -> tuple[float, float]:
    """(WER, CER) over (reference, hypothesis) pairs: total edits / total reference length."""
    word_edits = sum(edit_distance(r.split(), h.split()) for r, h in pairs)
    words = sum(len(r.split()) for r, _ in pairs)
    char_edits = sum(edit_distance(r, h) for r, h in pairs)
    chars = sum(len(r) for r, _ in pairs)
    return word_edits / max(words, 1), char_edits / max(chars, 1)
