import pytest

from dstrain.alphabet import Alphabet, AlphabetError, greedy_decode


def test_deepspeech_english_alphabet(alphabet_path):
    a = Alphabet.from_file(alphabet_path)
    assert len(a) == 28
    assert a.labels[0] == " " and a.space_index == 0
    assert a.labels[1] == "a" and a.labels[26] == "z" and a.labels[27] == "'"
    assert a.blank_index == 28


def test_comments_escaped_hash_and_blank_lines():
    a = Alphabet.from_text("# a comment\n \n\\#\n\nx\n#another\ny")  # no trailing newline on the last label
    assert a.labels == (" ", "#", "x", "y")
    assert a.encode("x #y") == [2, 0, 1, 3]


def test_serialize_round_trip_keeps_hash_label():
    a = Alphabet.from_text(" \n\\#\na\n")
    b = Alphabet.from_text(a.serialize())
    assert b == a and b.sha256() == a.sha256()


def test_missing_character_names_character_and_transcript(alphabet_path):
    a = Alphabet.from_file(alphabet_path)
    with pytest.raises(AlphabetError) as e:
        a.encode("naïve café")
    msg = str(e.value)
    assert "'ï'" in msg and "'é'" in msg and "naïve café" in msg


def test_duplicate_label_is_an_error():
    with pytest.raises(AlphabetError, match="appears twice"):
        Alphabet.from_text("a\nb\na\n")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AlphabetError, match="alphabet file not found"):
        Alphabet.from_file(str(tmp_path / "nope.txt"))


def test_russian_alphabet():
    from conftest import SHARED

    path = SHARED / "data" / "smoke" / "alphabet.ru"
    if not path.exists():
        pytest.skip("../shared/data/smoke not present")
    a = Alphabet.from_file(str(path))
    assert a.decode(a.encode("бедняга ребят")) == "бедняга ребят"


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    a = Alphabet.from_text(" \na\nb\nl\n")
    blank = a.blank_index
    # "a a" then "ll" needing a blank in between
    path = [1, 1, blank, 0, 1, blank, 3, 3, blank, 3, blank]
    assert greedy_decode(path, a) == "a all"
