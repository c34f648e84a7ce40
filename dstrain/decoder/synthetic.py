"""Synthetic posteriorgrams: a transcript spelled with random confusions and blank runs, as a half-trained model
outputs them. For decoder tests and benchmarks, where a trained acoustic model would be too slow to make."""

from __future__ import annotations

import numpy as np

from dstrain.alphabet import Alphabet


def noisy_posteriors(text: str, alphabet: Alphabet, rng: np.random.Generator, max_blanks: int = 2) -> np.ndarray:
    """``[frames, len(alphabet) + 1]``: 1-2 frames per character, then 0..``max_blanks`` blank frames."""
    frames = []
    for ch in text:
        for _ in range(rng.integers(1, 3)):
            p = rng.dirichlet(np.full(len(alphabet) + 1, 0.3))
            p[alphabet.encode(ch)[0]] += rng.uniform(0.5, 3.0)
            frames.append(p / p.sum())
        for _ in range(rng.integers(0, max_blanks + 1)):
            p = rng.dirichlet(np.full(len(alphabet) + 1, 0.3))
            p[alphabet.blank_index] += 3.0
            frames.append(p / p.sum())
    return np.array(frames)
