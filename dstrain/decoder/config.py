"""Beam search options, frozen, as Whisper's ``DecodingOptions``: one object handed to every decoding caller."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dstrain.alphabet import Alphabet
from dstrain.decoder.ctc import ctc_beam_search_decoder
from dstrain.decoder.scorer import Scorer


@dataclass(frozen=True)
class DecoderConfig:
    """Decoding: CTC beam search and the optional scorer"""

    beam_width: int = 1024
    """Beam width of the CTC beam search."""
    scorer_path: str = ""
    """DeepSpeech .scorer package; empty decodes without a language model."""
    lm_alpha: float | None = None
    """Language model weight; unset takes the package's default."""
    lm_beta: float | None = None
    """Word insertion bonus; unset takes the package's default."""
    cutoff_prob: float = 1.0
    """Cumulative probability of the characters considered per frame; 1.0 means no pruning."""
    cutoff_top_n: int = 300
    """At most this many characters considered per frame."""

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if not 0.0 < self.cutoff_prob <= 1.0:
            raise ValueError(f"cutoff_prob must be in (0, 1], got {self.cutoff_prob}")
        if self.cutoff_top_n < 1:
            raise ValueError(f"cutoff_top_n must be >= 1, got {self.cutoff_top_n}")

    def scorer(self, alphabet: Alphabet) -> Scorer | None:
        return Scorer(self.lm_alpha, self.lm_beta, self.scorer_path, alphabet) if self.scorer_path else None

    def decode(self, probs: np.ndarray, alphabet: Alphabet, scorer: Scorer | None) -> str:
        """Best transcript of ``probs`` ``[T, classes]`` (softmax outputs, blank last)."""
        return ctc_beam_search_decoder(probs, alphabet, self.beam_width, self.cutoff_prob, self.cutoff_top_n, scorer)[0][1]
