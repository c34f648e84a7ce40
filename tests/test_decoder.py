import math
import struct

import numpy as np
import pytest
from conftest import SHARED

from dstrain.alphabet import Alphabet
from dstrain.decoder.ctc import ctc_beam_search_decoder, ctc_beam_search_decoder_batch, pruned_log_probs
from dstrain.decoder.scorer import Scorer
from dstrain.decoder.scorer_package import ScorerError, read_scorer_package, vocabulary

SCORER = SHARED / "data" / "scorer" / "pruned_lm.scorer"
VOCAB = SHARED / "data" / "scorer" / "vocab.pruned.txt"
needs_scorer = pytest.mark.skipif(not SCORER.exists(), reason="../shared/data/scorer not present")

AB = Alphabet.from_text(" \na\nb\n")  # labels: space 0, a 1, b 2, blank 3


def test_two_frames_sum_over_paths():
    # 'a' via a-a, a-blank, blank-a: .6*.6 + .6*.4 + .4*.6 = .84; '' via blank-blank: .16.
    probs = np.array([[0, 0.6, 0, 0.4], [0, 0.6, 0, 0.4]])
    results = ctc_beam_search_decoder(probs, AB, beam_size=10, num_results=3)
    assert results[0][1] == "a" and results[0][0] == pytest.approx(math.log(0.84), abs=1e-6)
    assert results[1][1] == "" and results[1][0] == pytest.approx(math.log(0.16), abs=1e-6)
    # "aa" needs a blank between the a's: impossible in 2 frames. Zero-probability classes are still expanded at
    # ln(FLT_MIN), as DeepSpeech does, so a third result exists far below.
    assert "aa" not in [t for _, t in results] and results[2][0] < -80


def test_repeated_characters_need_a_blank():
    probs = np.array([[0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], dtype=float)
    assert ctc_beam_search_decoder(probs, AB, beam_size=4)[0][1] == "aa"
    probs = np.array([[0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=float)
    assert ctc_beam_search_decoder(probs, AB, beam_size=4)[0][1] == "a"


def test_beam_beats_greedy():
    # Greedy picks blank, blank ('' with .36); the sum over paths makes 'a' best: 1 - .36 = .64 > .36... per frame
    # blank .6 / a .4: P('') = .36, P('a') = .4*.4 + .4*.6 + .6*.4 = .64.
    probs = np.array([[0, 0.4, 0, 0.6], [0, 0.4, 0, 0.6]])
    ((score, text),) = ctc_beam_search_decoder(probs, AB, beam_size=8)
    assert text == "a" and score == pytest.approx(math.log(0.64), abs=1e-6)


def test_leading_certain_blanks_are_skipped_and_wrong_shape_rejected():
    probs = np.array([[0, 0, 0, 1.0], [0, 0.9, 0, 0.1]])
    assert ctc_beam_search_decoder(probs, AB, beam_size=4)[0][1] == "a"
    with pytest.raises(ValueError, match="alphabet"):
        ctc_beam_search_decoder(np.ones((2, 3)), AB, beam_size=4)


def test_pruning_follows_deepspeech():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    assert [c for c, _ in pruned_log_probs(probs, 1.0, 2)] == [0, 1, 2, 3]  # top_n alone does not prune
    assert [c for c, _ in pruned_log_probs(probs, 0.8, 40)] == [0, 1]
    assert [c for c, _ in pruned_log_probs(probs, 0.99, 3)] == [0, 1, 2]


def test_batch_respects_lengths():
    probs = np.array([[[0, 0.9, 0, 0.1], [0, 0, 0.9, 0.1]], [[0, 0, 0.9, 0.1], [0, 0.9, 0, 0.1]]])
    out = ctc_beam_search_decoder_batch(probs, [1, 2], AB, beam_size=4, num_processes=2)
    assert [r[0][1] for r in out] == ["a", "ba"]


@needs_scorer
def test_trie_holds_exactly_the_vocabulary(alphabet_path):
    package = read_scorer_package(str(SCORER))
    assert (package.utf8, package.alpha) == (False, 0.75) and package.beta == pytest.approx(1.85)
    words = vocabulary(package, Alphabet.from_file(alphabet_path).labels)
    expected = VOCAB.read_text().split()
    assert len(words) == len(expected) == 3540
    assert sorted(words) == sorted(expected)


def test_scorer_errors(tmp_path):
    with pytest.raises(ScorerError, match="not found"):
        read_scorer_package(str(tmp_path / "none.scorer"))
    (tmp_path / "x.scorer").write_bytes(b"hello")
    with pytest.raises(ScorerError, match="not a DeepSpeech scorer"):
        read_scorer_package(str(tmp_path / "x.scorer"))
    if SCORER.exists():
        data = bytearray(SCORER.read_bytes())
        at = data.rfind(b"EIRT")
        lm_only = tmp_path / "lm_only.scorer"
        lm_only.write_bytes(bytes(data[:at]))
        with pytest.raises(ScorerError, match="without a DeepSpeech trie"):
            read_scorer_package(str(lm_only))
        struct.pack_into("<i", data, at + 4, 5)
        (tmp_path / "v5.scorer").write_bytes(bytes(data))
        with pytest.raises(ScorerError, match="version 5"):
            read_scorer_package(str(tmp_path / "v5.scorer"))


def spell(text: str, alphabet: Alphabet, confusions: dict[int, dict[str, float]] | None = None) -> np.ndarray:
    """Posteriors spelling ``text``, one character then one blank frame each; ``confusions`` moves mass at a
    position."""
    frames = []
    for i, ch in enumerate(text):
        p = np.full(len(alphabet) + 1, 1e-4)
        for other, mass in (confusions or {}).get(i, {ch: 0.9}).items():
            p[alphabet.encode(other)[0]] = mass
        p[alphabet.blank_index] = 0.05
        frames.append(p / p.sum())
        b = np.full(len(alphabet) + 1, 1e-4)
        b[alphabet.blank_index] = 1.0
        frames.append(b / b.sum())
    return np.array(frames)


@needs_scorer
def test_scorer_fixes_a_confusable_word(alphabet_path):
    alphabet = Alphabet.from_file(alphabet_path)
    # Acoustically 'q' beats 'a' a little in "the man"; only the scorer knows "the mqn" is no English.
    probs = spell("the man", alphabet, {5: {"q": 0.5, "a": 0.4}})
    assert ctc_beam_search_decoder(probs, alphabet, beam_size=50)[0][1] == "the mqn"
    scorer = Scorer(0.75, 1.85, str(SCORER), alphabet)
    assert ctc_beam_search_decoder(probs, alphabet, beam_size=50, scorer=scorer)[0][1] == "the man"


@needs_scorer
def test_scorer_score_is_acoustic_plus_alpha_lm_plus_beta(alphabet_path):
    import kenlm

    alphabet = Alphabet.from_file(alphabet_path)
    scorer = Scorer(0.75, 1.85, str(SCORER), alphabet)
    probs = spell("the man", alphabet)
    ((score, text),) = ctc_beam_search_decoder(probs, alphabet, beam_size=100, scorer=scorer)
    ((acoustic, _),) = ctc_beam_search_decoder(probs, alphabet, beam_size=100)
    lm = kenlm.Model(str(SCORER))
    # Sentence start context, no sentence end; ln = log10 / log10(e).
    ln_lm = lm.score("the man", bos=True, eos=False) / math.log10(math.e)
    assert text == "the man"
    assert score == pytest.approx(acoustic + 0.75 * ln_lm + 2 * 1.85, abs=1e-3)


@needs_scorer
def test_hot_words_change_the_result(alphabet_path):
    alphabet = Alphabet.from_file(alphabet_path)
    scorer = Scorer(0.75, 1.85, str(SCORER), alphabet)
    probs = spell("the man", alphabet, {5: {"a": 0.5, "e": 0.4}})
    assert ctc_beam_search_decoder(probs, alphabet, beam_size=50, scorer=scorer)[0][1] == "the man"
    hot = ctc_beam_search_decoder(probs, alphabet, beam_size=50, scorer=scorer, hot_words={"men": 5.0})
    assert hot[0][1] == "the men"


def noisy_spelling(text: str, alphabet: Alphabet, rng: np.random.Generator) -> np.ndarray:
    from dstrain.decoder.synthetic import noisy_posteriors

    return noisy_posteriors(text, alphabet, rng, max_blanks=2)


@pytest.mark.parametrize("with_scorer", [False, True])
def test_compiled_search_matches_the_reference(with_scorer, alphabet_path):
    from dstrain.decoder.ctc import reference_beam_search

    if with_scorer and not SCORER.exists():
        pytest.skip("../shared/data/scorer not present")
    alphabet = Alphabet.from_file(alphabet_path)
    scorer = Scorer(0.75, 1.85, str(SCORER), alphabet) if with_scorer else None
    rng = np.random.default_rng(5)
    sentences = ["she had your dark suit", "the man had a car", "far from here", "i think so"]
    for i in range(8):
        probs = noisy_spelling(sentences[i % len(sentences)], alphabet, rng)
        kwargs = dict(beam_size=16, scorer=scorer, num_results=5, hot_words={"far": 2.0} if i == 2 else None)
        compiled = ctc_beam_search_decoder(probs, alphabet, **kwargs)
        reference = reference_beam_search(probs, alphabet, **kwargs)
        # float32 (as DeepSpeech) against float64: same transcripts in the same order, scores within rounding.
        assert [t for _, t in compiled] == [t for _, t in reference]
        np.testing.assert_allclose([s for s, _ in compiled], [s for s, _ in reference], rtol=1e-4, atol=1e-3)


@needs_scorer
def test_batch_in_processes_matches_single(alphabet_path):
    alphabet = Alphabet.from_file(alphabet_path)
    scorer = Scorer(0.75, 1.85, str(SCORER), alphabet)
    rng = np.random.default_rng(1)
    utterances = [noisy_spelling(s, alphabet, rng) for s in ("the man", "she had your dark suit", "far from here")]
    lengths = [len(u) for u in utterances]
    batch = np.zeros((3, max(lengths), len(alphabet) + 1))
    for i, u in enumerate(utterances):
        batch[i, : len(u)] = u
    parallel = ctc_beam_search_decoder_batch(batch, lengths, alphabet, 20, num_processes=2, scorer=scorer)
    single = [ctc_beam_search_decoder(u, alphabet, 20, scorer=scorer) for u in utterances]
    assert parallel == single
