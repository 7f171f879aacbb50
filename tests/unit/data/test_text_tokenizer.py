"""CLIP BPE text tokenizer: vocabulary layout, round trips, specials, whole-word grouping."""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_uni.data import text_tokenizer
from megatron_uni.data.text_tokenizer import ClipTokenizer, get_tokenizer

CAPTIONS = [
    "A photo of a cat.",
    "Two DOGS playing in the park, 2024!",
    "  extra   spaces\tand\nnewlines  ",
    "café au lait on a wooden table",
    "naïve résumé writing",
    "A man's bike, leaning against a wall.",
    "3.14 is roughly pi",
    "The Quick Brown Fox Jumps Over The Lazy Dog",
    "supercalifragilisticexpialidocious",
    "e-mail: someone@example.com",
    "emoji 🐱 and 日本語",
    "(parentheses) [brackets] {braces}?",
]
WORDS_ONLY = [
    "The Quick Brown Fox Jumps Over The Lazy Dog",
    "  extra   spaces\tand\nnewlines  ",
    "café au lait on a wooden table",
    "supercalifragilisticexpialidocious",
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def merge_lines() -> list[str]:
    """The vocabulary file's merge lines, read here independently of the tokenizer module."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().split("\n")[1 : 49152 - 256 - 2 + 1]


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def test_vocab_size_and_special_ids(tok: ClipTokenizer) -> None:
    assert tok.vocab_size == 49411
    assert (tok.sot_id, tok.eot_id) == (49406, 49407)
    assert (tok.mask_id, tok.gen_id, tok.spe_id) == (49408, 49409, 49410)
    for token, i in [
        ("<start_of_text>", 49406),
        ("<end_of_text>", 49407),
        ("<|mask|>", 49408),
        ("<|gen|>", 49409),
        ("<|spe|>", 49410),
    ]:
        assert tok.token_to_id(token) == i
        assert tok.id_to_token(i) == token
        assert tok.encode(token) == [i]
        assert tok.decode([i]) == token
    with pytest.raises(IndexError):
        tok.id_to_token(49411)
    with pytest.raises(KeyError, match="not a token"):
        tok.token_to_id("<|nope|>")


def test_known_ids_match_vocab_file(tok: ClipTokenizer, merge_lines: list[str]) -> None:
    # Single printable ASCII bytes come first, from "!" (id 0); the "</w>" copies follow at 256.
    assert tok.token_to_id("a") == ord("a") - ord("!")
    assert tok.token_to_id("a</w>") == 256 + ord("a") - ord("!")
    assert tok.encode("a") == [256 + ord("a") - ord("!")]
    # Merged tokens: id = 512 + the merge's line index after the header.
    for word in ["cat", "photo", "dog"]:
        line = next(i for i, m in enumerate(merge_lines) if m.replace(" ", "") == word + "</w>")
        assert tok.token_to_id(word + "</w>") == 512 + line
        assert tok.encode(word) == [512 + line]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_round_trip(tok: ClipTokenizer, caption: str) -> None:
    ids = tok.encode(caption)
    assert ids and all(0 <= i < tok.mask_id for i in ids)
    text = tok.decode(ids)
    # CLIP puts a space after every pre-token (punctuation, single digits), so compare with
    # whitespace removed, and require the decoded text to encode to the same ids.
    assert "".join(text.split()) == "".join(_normalised(caption).split())
    assert tok.encode(text) == ids
    assert text == text.strip() and "  " not in text


@pytest.mark.parametrize("caption", WORDS_ONLY)
def test_round_trip_exact_for_plain_words(tok: ClipTokenizer, caption: str) -> None:
    assert tok.decode(tok.encode(caption)) == _normalised(caption)


def test_specials_inside_text(tok: ClipTokenizer) -> None:
    ids = tok.encode("a <|mask|> cat <|GEN|><|spe|>")
    assert ids == [tok.encode("a")[0], 49408, tok.encode("cat")[0], 49409, 49410]
    assert tok.decode(ids) == "a <|mask|> cat <|gen|> <|spe|>"
    assert tok.decode([tok.spe_id] + tok.encode("a dog")) == "<|spe|> a dog"


def test_encode_batch(tok: ClipTokenizer) -> None:
    assert tok.encode_batch(CAPTIONS[:3]) == [tok.encode(c) for c in CAPTIONS[:3]]
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_whole_word_grouping(tok: ClipTokenizer) -> None:
    long_word = "supercalifragilisticexpialidocious"
    n = len(tok.encode(long_word))
    assert n > 1
    ids = tok.encode(f"{long_word} dogs <|mask|> run")
    assert tok.words(ids) == [list(range(n)), [n], [n + 1], [n + 2]]
    for group in tok.words(ids):
        assert tok.id_to_token(ids[group[-1]]).endswith(("</w>", "|>"))
    # A word cut off by truncation still forms a (last) group.
    assert tok.words(ids[: n - 1]) == [list(range(n - 1))]


def test_get_tokenizer_is_cached() -> None:
    assert get_tokenizer() is get_tokenizer()


def test_missing_vocab_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_vocab.txt.gz"
    with pytest.raises(FileNotFoundError, match="no_such_vocab"):
        ClipTokenizer(vocab_path=missing)


def test_missing_open_clip_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install open_clip_torch"):
        ClipTokenizer()


def test_open_clip_is_not_imported() -> None:
    # In a fresh interpreter: other tests in the session may import open_clip themselves.
    code = (
        "import sys; from megatron_uni.data.text_tokenizer import get_tokenizer; "
        "get_tokenizer(); assert 'open_clip' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
