"""Beam search options, frozen, as Whisper's ``DecodingOptions``: one object handed to every decoding caller."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dstrain.alphabet import Alphabet
from dstrain.config import option
from dstrain.decoder.ctc import ctc_beam_search_decoder
from dstrain.decoder.scorer import Scorer

DEFAULT_BEAM_WIDTH = 1024
"""DeepSpeech's --beam_width default, for training's test phase, dstrain evaluate and lm-optimize."""


@dataclass(frozen=True)
class DecoderConfig:
    """Decoding: CTC beam search and the optional scorer"""

    beam_width: int | None = None
    """Beam width of the CTC beam search; unset: 1024, except that dstrain transcribe takes the one the export
    records (its --export_beam_width), as DeepSpeech's client took the model's."""
    scorer_path: str = option("", names=("--scorer_path", "--scorer"))
    """DeepSpeech .scorer package (--scorer is DeepSpeech's alias); empty decodes without a language model."""
    lm_alpha: float | None = None
    """Language model weight; unset takes the package's default."""
    lm_beta: float | None = None
    """Word insertion bonus; unset takes the package's default."""
    cutoff_prob: float = 1.0
    """Cumulative probability of the characters considered per frame; 1.0 means no pruning."""
    cutoff_top_n: int = 300
    """At most this many characters considered per frame."""

    def __post_init__(self) -> None:
        if self.beam_width is not None and self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if not 0.0 < self.cutoff_prob <= 1.0:
            raise ValueError(f"cutoff_prob must be in (0, 1], got {self.cutoff_prob}")
        if self.cutoff_top_n < 1:
            raise ValueError(f"cutoff_top_n must be >= 1, got {self.cutoff_top_n}")

    def width(self, model_default: int | None = None) -> int:
        """The beam width: --beam_width, else the model's default (an export's --export_beam_width), else 1024."""
        return self.beam_width or model_default or DEFAULT_BEAM_WIDTH

    def scorer(self, alphabet: Alphabet) -> Scorer | None:
        return Scorer(self.lm_alpha, self.lm_beta, self.scorer_path, alphabet) if self.scorer_path else None

    def decode(self, probs: np.ndarray, alphabet: Alphabet, scorer: Scorer | None) -> str:
        """Best transcript of ``probs`` ``[T, classes]`` (softmax outputs, blank last)."""
        return ctc_beam_search_decoder(probs, alphabet, self.width(), self.cutoff_prob, self.cutoff_top_n, scorer)[0][1]
