import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.corpus import encode_text, split_tokens
from charlm.errors import DataError
from charlm.tokenizer import CharTokenizer, UnknownCharactersError


def test_vocab_is_sorted_unique_characters(corpus):
    tok = CharTokenizer.fit(corpus)
    assert list(tok.chars) == sorted(set(corpus))
    assert tok.encode("\n") == [0]  # "\n" sorts first, as in the lecture's stoi


def test_round_trip_and_vectorised_encoding_agree(corpus):
    tok, encoded = encode_text(corpus)
    assert tok.dtype == "uint8"
    assert list(encoded) == tok.encode(corpus)
    assert tok.decode(encoded) == corpus


def test_wide_vocabulary_switches_to_int16():
    text = "".join(chr(0x100 + i) for i in range(300)) + "abc"
    tok, encoded = encode_text(text)
    assert tok.vocab_size == 303 and tok.dtype == "int16" and tok.itemsize == 2
    ids = [int.from_bytes(encoded[i : i + 2], "little") for i in range(0, len(encoded), 2)]
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text


def test_unknown_characters_are_named():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(UnknownCharactersError, match=r"'x'.*'z'"):
        tok.encode("axbz")


def test_save_load(tmp_path, corpus):
    tok = CharTokenizer.fit(corpus)
    tok.save(tmp_path / "vocab.json")
    assert CharTokenizer.load(tmp_path / "vocab.json") == tok


@pytest.mark.parametrize("content", ["", "{", '{"chars": 5}', '{"chars": "ba"}', '{"chars": "ab", "vocab_size": 3}'])
def test_bad_vocab_file_names_the_file(tmp_path, content):
    path = tmp_path / "vocab.json"
    path.write_text(content)
    with pytest.raises(DataError, match="vocab.json"):
        CharTokenizer.load(path)


def test_split_is_contiguous_first_train_then_val():
    tokens = bytes(range(100))
    train, val = split_tokens(tokens, 1, 0.1)
    assert train == bytes(range(90)) and val == bytes(range(90, 100))
    train2, val2 = split_tokens(bytes(range(100)) * 2, 2, 0.1)  # int16: cut on a token boundary
    assert len(train2) == 180 and len(val2) == 20


def test_split_too_small_fails():
    with pytest.raises(DataError, match="val_fraction"):
        split_tokens(b"abc", 1, 0.1)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_round_trip_property(text):
    """Any text round-trips through a vocabulary fitted on it, whatever its characters."""
    tok, encoded = encode_text(text)
    assert tok.decode(tok.encode(text)) == text
    width = tok.itemsize
    ids = [int.from_bytes(encoded[i : i + width], "little") for i in range(0, len(encoded), width)]
    assert ids == tok.encode(text)
    assert CharTokenizer.from_json(tok.to_json()) == tok


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_round_trip_from_a_fixed_vocab(data):
    tok = CharTokenizer.fit("abc XYZ\n!é")
    text = data.draw(st.text(alphabet=tok.chars, max_size=100))
    assert tok.decode(tok.encode(text)) == text
