import numpy as np
import pytest
from conftest import SHARED, assert_says, tool
from test_decoder import SCORER, VOCAB, needs_scorer, spell

from dstrain.alphabet import Alphabet
from dstrain.decoder.ctc import ctc_beam_search_decoder
from dstrain.decoder.scorer import Scorer
from dstrain.decoder.scorer_build import build_package, minimal_trie
from dstrain.decoder.scorer_package import ScorerError, read_scorer_package, vocabulary


def test_minimal_trie_merges_shared_suffixes():
    # "ab", "cb": after a and after c the same future -> one state; with the final state: 4 states, 4 arcs.
    start, finals, arcs = minimal_trie([[1, 2], [3, 2]])
    assert start == 0 and len(finals) == 3 and sum(len(a) for a in arcs) == 3
    assert finals == [False, False, True]
    start, finals, arcs = minimal_trie([[1], [1, 2]])  # a word that is a prefix of another
    assert finals == [False, True, True]


@needs_scorer
def test_rebuilding_deepspeech_package_gives_the_same_trie(tmp_path, alphabet_path):
    alphabet = Alphabet.from_file(alphabet_path)
    original = read_scorer_package(str(SCORER))
    data = SCORER.read_bytes()
    lm = tmp_path / "lm.binary"
    lm.write_bytes(data[: original.lm_bytes])
    report = build_package(str(lm), str(VOCAB), str(tmp_path / "re.scorer"), alphabet, original.alpha, original.beta)
    rebuilt = (tmp_path / "re.scorer").read_bytes()
    # Minimal DFAs are unique up to numbering: same counts, same size, same header (properties included).
    assert (report.states, report.arcs) == (len(original.fst.states), len(original.fst.arcs)) == (3451, 6488)
    assert len(rebuilt) == len(data)
    header_end = original.lm_bytes + 25 + 4 + 9 + 12 + 4 * 2 + 8 * 4
    assert rebuilt[:header_end] == data[:header_end]
    again = read_scorer_package(str(tmp_path / "re.scorer"))
    assert sorted(vocabulary(again, alphabet.labels)) == sorted(VOCAB.read_text().split())
    probs = spell("the man had a dark suit", alphabet, {5: {"q": 0.5, "a": 0.4}})
    with_original = ctc_beam_search_decoder(
        probs, alphabet, 50, scorer=Scorer(0.75, 1.85, str(SCORER), alphabet), num_results=3
    )
    with_rebuilt = ctc_beam_search_decoder(
        probs, alphabet, 50, scorer=Scorer(0.75, 1.85, str(tmp_path / "re.scorer"), alphabet), num_results=3
    )
    assert with_rebuilt == with_original and with_original[0][1] == "the man had a dark suit"


def test_text_to_scorer_with_dstrain_alone(tmp_path, alphabet_path):
    import subprocess

    corpus = SHARED / "data" / "smoke" / "vocab.txt"
    if not corpus.exists():
        pytest.skip("../shared/data/smoke not present")
    out = subprocess.run(
        [tool("dstrain"), "scorer", "lm", "--text", str(corpus), "--output_dir", str(tmp_path), "--order", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    binary, vocab = out
    (tmp_path / "vocab_extra.txt").write_text(open(vocab).read() + " café naïve\n")
    proc = subprocess.run(
        [
            tool("dstrain"),
            "scorer",
            "build",
            "--alphabet",
            alphabet_path,
            "--lm",
            binary,
            "--vocab",
            str(tmp_path / "vocab_extra.txt"),
            "--package",
            str(tmp_path / "own.scorer"),
            "--default_alpha",
            "0.9",
            "--default_beta",
            "1.2",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert_says(proc.stdout, "2 word(s) skipped", "café")
    alphabet = Alphabet.from_file(alphabet_path)
    scorer = Scorer(None, None, str(tmp_path / "own.scorer"), alphabet)
    assert (scorer.alpha, scorer.beta) == (0.9, 1.2)  # the package's defaults
    words = set(vocabulary(scorer.package, alphabet.labels))
    assert "media" in words and "café" not in words
    # The corpus says "in the media"; acoustically "medja" wins, the new scorer fixes it.
    probs = spell("in the media", alphabet, {10: {"j": 0.5, "i": 0.4}})
    assert ctc_beam_search_decoder(probs, alphabet, 40)[0][1] == "in the medja"
    assert ctc_beam_search_decoder(probs, alphabet, 40, scorer=scorer)[0][1] == "in the media"


def test_bytes_output_mode_package_and_clear_errors(tmp_path, alphabet_path):
    if not SCORER.exists():
        pytest.skip("../shared/data/scorer not present")
    original = read_scorer_package(str(SCORER))
    lm = tmp_path / "lm.binary"
    lm.write_bytes(SCORER.read_bytes()[: original.lm_bytes])
    (tmp_path / "words.txt").write_text("привет мир hello\n")
    report = build_package(
        str(lm), str(tmp_path / "words.txt"), str(tmp_path / "utf8.scorer"), None, 0.5, 1.0, utf8=True
    )
    package = read_scorer_package(str(tmp_path / "utf8.scorer"))
    assert package.utf8 and report.words == 3
    assert sorted(vocabulary(package)) == ["hello", "мир", "привет"]
    with pytest.raises(ScorerError, match="UTF-8"):
        Scorer(0.5, 1.0, str(tmp_path / "utf8.scorer"), Alphabet.from_file(alphabet_path))
    (tmp_path / "lm.arpa").write_text("\\data\\\nngram 1=1\n")
    with pytest.raises(ScorerError, match="not a KenLM binary"):
        build_package(
            str(tmp_path / "lm.arpa"),
            str(tmp_path / "words.txt"),
            str(tmp_path / "x.scorer"),
            None,
            0.5,
            1.0,
            utf8=True,
        )


def byte_posteriors(text: str, confusions: dict[int, dict[int, float]] | None = None) -> np.ndarray:
    """UTF-8 mode posteriors (255 byte labels + blank): one frame per byte, then a blank frame per character."""
    frames = []
    for ch in text:
        for b in ch.encode("utf-8"):
            p = np.full(256, 1e-4)
            for byte, mass in (confusions or {}).get(len(frames), {b: 0.9}).items():
                p[byte - 1] = mass
            p[255] = 0.05
            frames.append(p / p.sum())
        blank = np.full(256, 1e-4)
        blank[255] = 1.0
        frames.append(blank / blank.sum())
    return np.array(frames)


def test_utf8_mode_with_a_bytes_scorer(tmp_path):
    """DeepSpeech's bytes output mode: a character-level LM (each character a "word"), a trie of characters,
    LM scores at every completed codepoint."""
    import subprocess

    from dstrain.alphabet import UTF8Alphabet

    words = ["бедняга", "ребят", "должен", "месте", "быть", "бедняга", "была", "нога", "дорога"]
    (tmp_path / "chars.txt").write_text("\n".join(" ".join(w) for w in words * 20) + "\n")
    out = subprocess.run(
        [
            tool("dstrain"),
            "scorer",
            "lm",
            "--text",
            str(tmp_path / "chars.txt"),
            "--output_dir",
            str(tmp_path),
            "--order",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    binary, vocab = out
    report = build_package(binary, vocab, str(tmp_path / "ru.scorer"), None, 2.0, 0.0, utf8=True)
    assert report.words == len(set("".join(words)))
    alphabet = UTF8Alphabet()
    scorer = Scorer(None, None, str(tmp_path / "ru.scorer"), alphabet)
    # "бедняга" with its last letter's second byte confusable: а = D0 B0, о = D0 BE. Byte frames: 2 per letter
    # plus a blank, so the last letter's second byte is frame 3 * 6 + 1.
    probs = byte_posteriors("бедняга", {19: {0xBE: 0.5, 0xB0: 0.4}})
    assert ctc_beam_search_decoder(probs, alphabet, 30)[0][1] == "бедняго"
    assert ctc_beam_search_decoder(probs, alphabet, 30, scorer=scorer)[0][1] == "бедняга"
    # A character outside the trie cannot be produced with the scorer: "ж" (D0 B6) is not in the corpus.
    probs = byte_posteriors("нога", {1: {0xB6: 0.6, 0xBD: 0.3}})  # frame 1: second byte of н (D0 BD)
    assert ctc_beam_search_decoder(probs, alphabet, 30)[0][1] == "жога"
    assert ctc_beam_search_decoder(probs, alphabet, 30, scorer=scorer)[0][1] == "нога"
