"""External scorer: a KenLM model plus the vocabulary trie of a DeepSpeech ``.scorer`` package."""

from __future__ import annotations

import math

import kenlm

from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.decoder.scorer_package import ScorerError, read_scorer_package, vocabulary

OOV_SCORE = -1000.0
_LOG10_E = math.log10(math.e)  # KenLM scores are log10; the search works in natural logs


class Scorer:
    """DeepSpeech's ``Scorer(alpha, beta, scorer_path, alphabet)``: word-level LM scoring at word boundaries."""

    def __init__(
        self,
        alpha: float | None = None,
        beta: float | None = None,
        scorer_path: str = "",
        alphabet: Alphabet | UTF8Alphabet | None = None,
    ):
        if not scorer_path:
            raise ScorerError("scorer_path is empty (--scorer_path)")
        self.path = scorer_path
        self.package = read_scorer_package(scorer_path)
        if self.package.utf8:
            alphabet = alphabet or UTF8Alphabet()
            if not isinstance(alphabet, UTF8Alphabet):
                raise ScorerError(f"{scorer_path} is a UTF-8 (bytes output) scorer: decode with UTF8Alphabet()")
        elif alphabet is None or isinstance(alphabet, UTF8Alphabet):
            raise ScorerError(f"{scorer_path} is a character-mode scorer: decode with the alphabet it was built for")
        self.alphabet = alphabet
        self.alpha = self.package.alpha if alpha is None else float(alpha)
        self.beta = self.package.beta if beta is None else float(beta)
        self.model = kenlm.Model(scorer_path)
        self.max_order = self.model.order
        self.fst = self.package.fst
        self._cache: dict[tuple[bool, tuple[str, ...]], float] = {}
        self._vocabulary: frozenset[str] | None = None
        self.compiled: dict = {}
        """Compiled decoders by alphabet labels (dstrain.decoder.ctc fills it)."""

    def reset_params(self, alpha: float, beta: float) -> None:
        self.alpha, self.beta = float(alpha), float(beta)

    def is_utf8_mode(self) -> bool:
        return self.package.utf8

    def vocabulary(self) -> frozenset[str]:
        """The words of the scorer's trie: the only words a decode with this scorer can output."""
        if self._vocabulary is None:
            labels = None if self.package.utf8 else self.alphabet.labels
            self._vocabulary = frozenset(vocabulary(self.package, labels))
        return self._vocabulary

    def log_cond_prob(self, ngram: tuple[str, ...], bos: bool) -> float:
        """ln P(last word | previous words); OOV anywhere in the n-gram gives -1000, as DeepSpeech."""
        key = (bos, ngram)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        model = self.model
        state, out = kenlm.State(), kenlm.State()
        if bos:
            model.BeginSentenceWrite(state)
        else:
            model.NullContextWrite(state)
        score = 0.0
        for word in ngram:
            if word not in model:
                score = OOV_SCORE
                break
            score = model.BaseScore(state, word, out) / _LOG10_E
            state, out = out, state
        self._cache[key] = score
        return score
