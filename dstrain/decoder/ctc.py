"""CTC prefix beam search with an optional KenLM scorer, as DeepSpeech's native_client/ctcdecode.

The search runs in C++ (``_ctc_search.cpp``, built by setup.py); :func:`reference_beam_search` is the same
algorithm in Python, the specification the compiled one is tested against.

Prefixes live in a trie (one node per prefix); each holds the log probabilities of ending in blank and in
non-blank at the previous and current frame. With a scorer, prefixes are constrained to the scorer's vocabulary
trie, and at each word boundary (a space) ``alpha * ln P_lm(word | history) + beta`` is added; the unfinished last
word is scored when decoding ends. Probabilities come in with the CTC blank last, as the model outputs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.decoder.scorer import Scorer

NEG_INF = -math.inf
# ds_ctcdecoder's own Python default, kept so code written against its API decodes alike. DeepSpeech's --cutoff_top_n
# flag (300) is a different default, for the command line: that one lives in DecoderConfig.
API_CUTOFF_TOP_N = 40
_FLT_MIN = np.finfo(np.float32).tiny  # DeepSpeech adds FLT_MIN before the log


def log_sum_exp(x: float, y: float) -> float:
    if x == NEG_INF:
        return y
    if y == NEG_INF:
        return x
    m = x if x > y else y
    return math.log(math.exp(x - m) + math.exp(y - m)) + m


class _Node:
    __slots__ = (
        "character",
        "parent",
        "children",
        "exists",
        "b_prev",
        "nb_prev",
        "b_cur",
        "nb_cur",
        "score",
        "dict_state",
    )

    def __init__(self, character: int, parent: "_Node | None", dict_state: int):
        self.character = character
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.exists = True
        self.b_prev = self.nb_prev = self.b_cur = self.nb_cur = self.score = NEG_INF
        self.dict_state = dict_state

    def collect(self, out: list["_Node"]) -> None:
        """Advance one frame (cur -> prev) and list existing prefixes, parents before children."""
        stack = [self]
        while stack:
            node = stack.pop()
            if node.exists:
                node.b_prev, node.nb_prev = node.b_cur, node.nb_cur
                node.b_cur = node.nb_cur = NEG_INF
                node.score = log_sum_exp(node.b_prev, node.nb_prev)
                out.append(node)
            stack.extend(reversed(list(node.children.values())))

    def remove(self) -> None:
        self.exists = False
        node = self
        while not node.children and not node.exists and node.parent is not None:
            del node.parent.children[node.character]
            node = node.parent

    def labels(self) -> list[int]:
        out, node = [], self
        while node.parent is not None:
            out.append(node.character)
            node = node.parent
        return out[::-1]


@dataclass(frozen=True)
class _Dictionary:
    """Sorted-arc view of the scorer's trie: (state, label) -> next state."""

    start: int
    arcs: dict[tuple[int, int], int]
    final: np.ndarray

    @classmethod
    def from_scorer(cls, scorer: Scorer) -> "_Dictionary":
        fst = scorer.fst
        arcs = {}
        for state in range(len(fst.states)):
            for arc in fst.arcs_of(state):
                arcs[(state, int(arc["ilabel"]))] = int(arc["nextstate"])
        return cls(fst.start, arcs, np.isfinite(fst.states["final"]))


def pruned_log_probs(probs: np.ndarray, cutoff_prob: float, cutoff_top_n: int) -> list[tuple[int, float]]:
    """Classes to expand at one frame, as DeepSpeech's get_pruned_log_probs (including its quirks)."""
    n = probs.shape[0]
    order = list(range(n))
    cutoff_len = n
    if cutoff_prob < 1.0 or cutoff_top_n < n:
        order = sorted(order, key=lambda i: -probs[i])
        if cutoff_prob < 1.0:
            cumulative, cutoff_len = 0.0, 0
            for i in order:
                cumulative += probs[i]
                cutoff_len += 1
                if cumulative >= cutoff_prob or cutoff_len >= cutoff_top_n:
                    break
        # With cutoff_prob == 1.0, DeepSpeech sorts but keeps every class: top_n alone does not prune.
    return [(i, math.log(float(probs[i]) + _FLT_MIN)) for i in order[:cutoff_len]]


class _Search:
    def __init__(
        self,
        alphabet: Alphabet,
        beam_size: int,
        cutoff_prob: float,
        cutoff_top_n: int,
        scorer: Scorer | None,
        hot_words: dict[str, float],
    ):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.alphabet = alphabet
        self.space = alphabet.space_index
        self.blank = alphabet.blank_index
        self.beam_size, self.cutoff_prob, self.cutoff_top_n = beam_size, cutoff_prob, cutoff_top_n
        self.scorer = scorer
        self.hot_words = dict(hot_words)
        self.dictionary = _Dictionary.from_scorer(scorer) if scorer is not None else None
        self.root = _Node(-1, None, self.dictionary.start if self.dictionary else 0)
        self.root.score = self.root.b_prev = 0.0
        self.prefixes = [self.root]
        self.started = False

    # --- scorer helpers
    def ngram(self, node: _Node) -> tuple[str, ...]:
        """Up to max_order words ending at ``node``, oldest first (DeepSpeech's make_ngram)."""
        words: list[str] = []
        current: _Node | None = node
        for _ in range(self.scorer.max_order):
            if current is None or current.character == -1:
                break
            chars = []
            while current.parent is not None and current.character != self.space:
                chars.append(current.character)
                current = current.parent
            words.append(self.alphabet.decode(reversed(chars)))
            current = current.parent
        return tuple(reversed(words))

    def word_score(self, node: _Node) -> float:
        ngram = self.ngram(node)
        boost = sum(self.hot_words.get(w, 0.0) for w in ngram) if self.hot_words else 0.0
        bos = len(ngram) < self.scorer.max_order
        return (self.scorer.log_cond_prob(ngram, bos) + boost) * self.scorer.alpha + self.scorer.beta

    def child(self, node: _Node, c: int) -> _Node | None:
        existing = node.children.get(c)
        if existing is not None:
            if not existing.exists:
                existing.exists = True
                existing.b_prev = existing.nb_prev = existing.b_cur = existing.nb_cur = NEG_INF
            return existing
        d = self.dictionary
        if d is None:
            new = _Node(c, node, 0)
        else:
            nxt = d.arcs.get((node.dict_state, c + 1))
            if nxt is None:
                return None  # outside the vocabulary
            # A complete word (trie final state) restarts the dictionary for the next word.
            new = _Node(c, node, d.start if d.final[nxt] else nxt)
        node.children[c] = new
        return new

    @staticmethod
    def _rank(node: _Node) -> tuple[float, int]:
        return (-node.score, node.character)

    def step(self, probs: np.ndarray) -> None:
        if probs[self.blank] < 0.999:
            self.started = True
        if not self.started:  # DeepSpeech delays expansion through leading near-certain blanks
            return
        min_cutoff, full_beam = NEG_INF, False
        if self.scorer is not None:
            n = min(len(self.prefixes), self.beam_size)
            self.prefixes.sort(key=self._rank)
            min_cutoff = self.prefixes[n - 1].score + math.log(float(probs[self.blank])) - max(0.0, self.scorer.beta)
            full_beam = n == self.beam_size
        for c, log_prob_c in pruned_log_probs(probs, self.cutoff_prob, self.cutoff_top_n):
            for prefix in self.prefixes[: self.beam_size]:
                if full_beam and log_prob_c + prefix.score < min_cutoff:
                    break
                if prefix.score == NEG_INF:
                    continue
                if c == self.blank:
                    prefix.b_cur = log_sum_exp(prefix.b_cur, log_prob_c + prefix.score)
                    continue
                if c == prefix.character:
                    prefix.nb_cur = log_sum_exp(prefix.nb_cur, log_prob_c + prefix.nb_prev)
                new = self.child(prefix, c)
                if new is None:
                    continue
                if c == prefix.character:
                    log_p = log_prob_c + prefix.b_prev if prefix.b_prev > NEG_INF else NEG_INF
                else:
                    log_p = log_prob_c + prefix.score
                if self.scorer is not None and c == self.space:
                    log_p += self.word_score(prefix)  # score the word the space completes
                new.nb_cur = log_sum_exp(new.nb_cur, log_p)
        self.prefixes = []
        self.root.collect(self.prefixes)
        if len(self.prefixes) > self.beam_size:
            self.prefixes.sort(key=self._rank)
            for node in self.prefixes[self.beam_size :]:
                node.remove()
            del self.prefixes[self.beam_size :]

    def results(self, num_results: int) -> list[tuple[float, list[int]]]:
        scored = []
        for i, prefix in enumerate(self.prefixes):
            score = prefix.score
            if (
                self.scorer is not None
                and i < self.beam_size
                and prefix.parent is not None
                and prefix.character != self.space
            ):
                score += self.word_score(prefix)  # the unfinished last word
            scored.append((score, prefix))
        scored.sort(key=lambda sp: (-sp[0], sp[1].character))
        return [(score, prefix.labels()) for score, prefix in scored[:num_results]]


def _check(probs_seq: np.ndarray, alphabet: Alphabet) -> np.ndarray:
    probs_seq = np.ascontiguousarray(probs_seq, dtype=np.float64)
    if probs_seq.ndim != 2 or probs_seq.shape[1] != len(alphabet) + 1:
        raise ValueError(f"probs_seq must be [time, {len(alphabet) + 1}] (alphabet + blank), got {probs_seq.shape}")
    return probs_seq


def reference_beam_search(
    probs_seq: np.ndarray,
    alphabet: Alphabet,
    beam_size: int,
    cutoff_prob: float = 1.0,
    cutoff_top_n: int = API_CUTOFF_TOP_N,
    scorer: Scorer | None = None,
    hot_words: dict[str, float] | None = None,
    num_results: int = 1,
) -> list[tuple[float, str]]:
    """The search in pure Python (float64): the specification of the compiled decoder in character mode."""
    if isinstance(alphabet, UTF8Alphabet):
        raise ValueError("the reference search covers character mode; UTF-8 mode is in the compiled decoder only")
    probs_seq = _check(probs_seq, alphabet)
    search = _Search(alphabet, beam_size, cutoff_prob, cutoff_top_n, scorer, hot_words or {})
    for frame in probs_seq:
        search.step(frame)
    return [(score, alphabet.decode(labels)) for score, labels in search.results(num_results)]


def _compiled(alphabet: Alphabet, scorer: Scorer | None):
    from dstrain.decoder import _ctc_search

    utf8 = isinstance(alphabet, UTF8Alphabet)
    if scorer is None:
        return _ctc_search.Decoder(alphabet.label_bytes(), alphabet.blank_index, _space(alphabet), utf8)
    # One compiled decoder per scorer and alphabet: it holds the vocabulary trie and the LM score cache.
    key = alphabet.labels
    decoder = scorer.compiled.get(key)
    if decoder is None:
        decoder = _ctc_search.Decoder(alphabet.label_bytes(), alphabet.blank_index, _space(alphabet), utf8)
        fst = scorer.fst
        state_of_arc = np.repeat(np.arange(len(fst.states)), fst.states["narcs"].astype(np.int64))
        order = np.lexsort((fst.arcs["ilabel"], state_of_arc))  # arcs sorted by label within each state
        decoder.set_dictionary(
            fst.start,
            fst.states["pos"].astype(np.int64),
            fst.states["narcs"].astype(np.int64),
            np.ascontiguousarray(fst.arcs["ilabel"][order]),
            np.ascontiguousarray(fst.arcs["nextstate"][order]),
            np.isfinite(fst.states["final"]).astype(np.uint8),
        )
        scorer.compiled[key] = decoder
    return decoder


def _space(alphabet: Alphabet) -> int:
    return -1 if alphabet.space_index is None else alphabet.space_index


def ctc_beam_search_decoder(
    probs_seq: np.ndarray,
    alphabet: Alphabet,
    beam_size: int,
    cutoff_prob: float = 1.0,
    cutoff_top_n: int = API_CUTOFF_TOP_N,
    scorer: Scorer | None = None,
    hot_words: dict[str, float] | None = None,
    num_results: int = 1,
) -> list[tuple[float, str]]:
    """Best transcripts of ``probs_seq`` ``[T, len(alphabet)+1]`` (softmax outputs, blank last) as (score, text)."""
    probs_seq = _check(probs_seq, alphabet)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    decoder = _compiled(alphabet, scorer)
    lm = None
    if scorer is not None:
        # Words arrive as bytes (in UTF-8 mode possibly a partial codepoint, which KenLM then calls OOV).
        lm = lambda words, bos: scorer.log_cond_prob(tuple(w.decode("utf-8", "replace") for w in words), bos)  # noqa: E731
    results = decoder.decode(
        probs_seq,
        beam_size,
        cutoff_prob,
        cutoff_top_n,
        lm,
        scorer.alpha if scorer else 0.0,
        scorer.beta if scorer else 0.0,
        scorer.max_order if scorer else 0,
        dict(hot_words or {}),
        num_results,
    )
    return [(score, alphabet.decode(labels)) for score, labels in results]


# Per worker process: the scorer, loaded once by the pool's initializer.
_WORKER_SCORER: Scorer | None = None


def _init_worker(scorer_args: tuple | None, alphabet: Alphabet) -> None:
    global _WORKER_SCORER
    if scorer_args is not None:
        path, alpha, beta = scorer_args
        _WORKER_SCORER = Scorer(alpha, beta, path, alphabet)


def _decode_one(job: tuple) -> list[tuple[float, str]]:
    probs, alphabet, beam_size, cutoff_prob, cutoff_top_n, hot_words, num_results = job
    return ctc_beam_search_decoder(
        probs, alphabet, beam_size, cutoff_prob, cutoff_top_n, _WORKER_SCORER, hot_words, num_results
    )


def ctc_beam_search_decoder_batch(
    probs_seq: np.ndarray,
    seq_lengths: Sequence[int],
    alphabet: Alphabet,
    beam_size: int,
    num_processes: int,
    cutoff_prob: float = 1.0,
    cutoff_top_n: int = API_CUTOFF_TOP_N,
    scorer: Scorer | None = None,
    hot_words: dict[str, float] | None = None,
    num_results: int = 1,
) -> list[list[tuple[float, str]]]:
    """Decode ``probs_seq`` ``[B, T, C]`` with per-item lengths, on ``num_processes`` processes."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if len(seq_lengths) != len(probs_seq):
        raise ValueError("need one sequence length per batch element")
    items = [np.ascontiguousarray(p[:n]) for p, n in zip(probs_seq, seq_lengths)]
    if num_processes == 1 or len(items) < 2:
        return [
            ctc_beam_search_decoder(p, alphabet, beam_size, cutoff_prob, cutoff_top_n, scorer, hot_words, num_results)
            for p in items
        ]
    import multiprocessing

    # Each worker loads the scorer itself (a KenLM model does not pickle); spawn keeps workers clear of
    # TensorFlow's threads in the parent.
    scorer_args = (scorer.path, scorer.alpha, scorer.beta) if scorer is not None else None
    jobs = [(p, alphabet, beam_size, cutoff_prob, cutoff_top_n, dict(hot_words or {}), num_results) for p in items]
    with multiprocessing.get_context("spawn").Pool(
        min(num_processes, len(items)), _init_worker, (scorer_args, alphabet)
    ) as pool:
        return pool.map(_decode_one, jobs, chunksize=max(1, len(jobs) // (4 * num_processes)))
