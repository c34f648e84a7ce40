"""Transcript normalisation shared by the importers, following DeepSpeech's English importers."""

from __future__ import annotations

import re
import unicodedata

from dstrain.alphabet import Alphabet

_UNSPEAKABLE = re.compile(r"[0-9]|[(<\[\]&*{]")  # digits and markup: no single right spelling
_DROP = str.maketrans("", "", '.,;?!:"')


def normalise_english(label: str, ascii_only: bool = False) -> str | None:
    """Lower-case, hyphens/underscores to spaces, punctuation dropped; None when the sentence cannot be used.

    As DeepSpeech's ``validate_label_eng`` (with ``--normalize``: NFKD, then ASCII only).
    """
    if ascii_only:
        label = unicodedata.normalize("NFKD", label.strip()).encode("ascii", "ignore").decode("ascii")
    if _UNSPEAKABLE.search(label):
        return None
    label = label.replace("-", " ").replace("_", " ")
    label = re.sub(" {2,}", " ", label)
    label = label.translate(_DROP).strip().lower()
    return label or None


class LabelFilter:
    """Normalise a sentence and check it against an alphabet; ``reason`` says why a sentence was refused."""

    def __init__(self, alphabet: Alphabet | None = None, ascii_only: bool = False):
        self.alphabet, self.ascii_only = alphabet, ascii_only

    def __call__(self, sentence: str) -> tuple[str | None, str]:
        label = normalise_english(sentence, self.ascii_only)
        if label is None:
            return None, "unusable_sentence"
        if self.alphabet is not None and self.alphabet.missing(label):
            return None, "alphabet"
        return label, ""
