import pytest

from dstrain.metrics import edit_distance, error_rates


def _reference_distance(a, b) -> int:
    """Textbook dynamic programme, the specification rapidfuzz is held to."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize(
    "a,b",
    [
        ("", ""),
        ("abc", ""),
        ("kitten", "sitting"),
        ("flaw", "lawn"),
        ("ab ba", "ba ab"),
        ("she had your dark suit", "he had you dark suits"),
    ],
)
def test_edit_distance_matches_the_textbook_definition(a, b):
    assert edit_distance(a, b) == _reference_distance(a, b)
    assert edit_distance(a.split(), b.split()) == _reference_distance(a.split(), b.split())


def test_words_are_compared_whole():
    # Character-wise these differ by one; as words it is one substitution of one word.
    assert edit_distance(["dark"], ["bark"]) == 1 and edit_distance(["a", "b"], ["a", "b"]) == 0


def test_corpus_rates_pool_edits():
    wer, cer = error_rates([("a b c", "a x c"), ("d e", "d e f")])
    assert wer == pytest.approx(2 / 5) and cer == pytest.approx(3 / 8)


def test_long_transcripts_are_fast_enough_to_use():
    ref = " ".join(f"w{i % 97}" for i in range(20000))
    hyp = ref.replace("w5 ", "w6 ")
    assert error_rates([(ref, hyp)])[0] > 0
