"""Text corpus -> KenLM binary language model, as DeepSpeech's data/lm/generate_lm.py: keep the ``top_k`` most
frequent words, estimate an n-gram model with KenLM's ``lmplz`` restricted to them, quantise it into a trie binary
with ``build_binary``. The two programs are built from the kenlm source on PyPI by tools/install.sh."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from dataclasses import dataclass

from dstrain.config import option
from dstrain.executables import find_executable


@dataclass(frozen=True)
class LmConfig:
    """dstrain scorer lm: text corpus -> KenLM binary model and vocabulary (DeepSpeech's generate_lm.py)"""

    text: str = option()
    """Training text, one sentence per line, already normalised like the transcripts (lower case, alphabet only)."""
    output_dir: str = option()
    """Where lm.binary and vocab-N.txt go."""
    order: int = 5
    """n-gram order."""
    top_k: int = 500000
    """Vocabulary size: the most frequent words; the others become <unk>."""
    prune: tuple[int, ...] = option((0, 0, 1), nargs="*")
    """lmplz --prune thresholds per order (DeepSpeech: 0 0 1)."""
    memory: str = "50%"
    """lmplz's memory budget (--memory)."""

    def __post_init__(self) -> None:
        if not 2 <= self.order <= 6:
            raise ValueError(f"order must be in 2..6 (KenLM is built with KENLM_MAX_ORDER=6), got {self.order}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


def build_lm(cfg: LmConfig) -> tuple[str, str]:
    """Returns (binary model path, vocabulary path)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    counts: Counter[str] = Counter()
    with open(cfg.text, encoding="utf-8") as f:
        for line in f:
            counts.update(line.split())
    if not counts:
        raise ValueError(f"{cfg.text}: no words")
    vocab = [w for w, _ in counts.most_common(cfg.top_k)]
    vocab_path = os.path.join(cfg.output_dir, f"vocab-{len(vocab)}.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write(" ".join(vocab) + "\n")
    arpa = os.path.join(cfg.output_dir, "lm.arpa")
    prune = [str(p) for p in cfg.prune[: cfg.order]]
    lmplz = [
        find_executable("lmplz"),
        "--order",
        str(cfg.order),
        "--memory",
        cfg.memory,
        "--temp_prefix",
        cfg.output_dir,
        "--text",
        cfg.text,
        "--arpa",
        arpa,
        "--limit_vocab_file",
        vocab_path,
        "--skip_symbols",
        "--discount_fallback",  # small corpora lack the counts-of-counts Kneser-Ney discounts need
    ] + (["--prune", *prune] if prune else [])
    _run(lmplz)
    binary = os.path.join(cfg.output_dir, "lm.binary")
    _run([find_executable("build_binary"), "-a", "255", "-q", "8", "-v", "trie", arpa, binary])
    os.remove(arpa)
    return binary, vocab_path


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(argv[0])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run_lm(cfg: LmConfig) -> int:
    binary, vocab = build_lm(cfg)
    print(f"{binary}\n{vocab}")
    return 0
