"""CLIP byte-level BPE text tokenizer plus Uni-Perceiver's three special tokens.

Vocabulary layout (49,411 ids), as in OpenAI CLIP with our specials appended:

    0 ..   255   the 256 byte symbols (GPT-2 byte-to-unicode map)
    256 .. 511   the same symbols with the end-of-word marker ``</w>``
    512 .. 49405 the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``, in file order
    49406        ``<start_of_text>``        49407  ``<end_of_text>``
    49408        ``<|mask|>``               49409  ``<|gen|>``        49410  ``<|spe|>``

The merges file is the one the PyPI package ``open_clip_torch`` ships. It is found with
``importlib.util.find_spec`` so that ``open_clip`` itself (slow, pulls hub code) is never imported.
A word's last BPE token ends in ``</w>``; ``ClipTokenizer.words`` uses that for whole-word masking.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

from megatron_uni.batch import SPE_ID, VOCAB_SIZE

try:  # ftfy repairs mojibake the way CLIP's training data was cleaned; optional.
    import ftfy
except ImportError:  # pragma: no cover - exercised only without ftfy installed
    ftfy = None

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file (48,894)
END_OF_WORD = "</w>"

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
MASK_TOKEN = "<|mask|>"
GEN_TOKEN = "<|gen|>"
SPE_TOKEN = "<|spe|>"
SPECIAL_TOKENS = (SOT_TOKEN, EOT_TOKEN, MASK_TOKEN, GEN_TOKEN, SPE_TOKEN)

# CLIP's pre-tokenisation: English contractions, runs of letters, single digits, runs of other
# non-space symbols. Text is lower-cased before this runs.
_WORD_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)
_SPECIAL_PATTERN = regex.compile("(" + "|".join(regex.escape(t) for t in SPECIAL_TOKENS) + ")")


def default_vocab_path() -> Path:
    """Path of the merges file inside the installed ``open_clip`` package, without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the CLIP BPE vocabulary comes from the open_clip package, which is not installed: "
            "run `pip install open_clip_torch` (or pass vocab_path=... to ClipTokenizer)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / VOCAB_FILE_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"open_clip is installed but has no {VOCAB_FILE_NAME} in "
        f"{list(spec.submodule_search_locations)}: reinstall with `pip install open_clip_torch`"
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (control bytes, space, ...) are shifted to
    code points 256 and up, so that no BPE symbol is whitespace or a control character. The dict's
    insertion order is CLIP's order of the first 256 vocabulary entries.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(keep)
    shift = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def clean_text(text: str) -> str:
    """CLIP's normalisation: ftfy repair, double HTML unescape, collapse whitespace, lower-case."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _read_merges(vocab_path: Path) -> list[tuple[str, str]]:
    if not vocab_path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary file not found: {vocab_path} (pass an existing "
            f"{VOCAB_FILE_NAME}, or omit vocab_path to use the one installed by "
            "`pip install open_clip_torch`)"
        )
    with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is the "#version" header; CLIP uses the next NUM_MERGES lines.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{vocab_path} is not CLIP's merges file: expected {NUM_MERGES} lines of 'a b' pairs "
            f"after the header"
        )
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """CLIP BPE (49,408 ids) plus ``<|mask|>``, ``<|gen|>``, ``<|spe|>`` = 49,411 ids.

    ``encode`` adds no special tokens; special-token strings in the input text map to their ids.
    """

    vocab_size: int = VOCAB_SIZE  # the batch contract's numbers, checked when built
    sot_id: int = 49406
    eot_id: int = 49407
    mask_id: int = 49408
    gen_id: int = 49409
    spe_id: int = SPE_ID

    def __init__(self, vocab_path: str | Path | None = None, bpe_cache_size: int = 1 << 16) -> None:
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        merges = _read_merges(path)

        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += list(SPECIAL_TOKENS)
        if len(vocab) != self.vocab_size:  # pragma: no cover - guarded by _read_merges
            raise ValueError(f"built {len(vocab)} tokens from {path}, expected {self.vocab_size}")

        self._id_to_token: list[str] = vocab
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(vocab)}
        self._special_ids = {self._token_to_id[t]: t for t in SPECIAL_TOKENS}
        for name, token in (
            ("sot_id", SOT_TOKEN),
            ("eot_id", EOT_TOKEN),
            ("mask_id", MASK_TOKEN),
            ("gen_id", GEN_TOKEN),
            ("spe_id", SPE_TOKEN),
        ):
            assert self._token_to_id[token] == getattr(self, name), name
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.vocab_path = path
        # Per instance (not a decorated method) so the cache dies with the tokenizer.
        self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_word)

    # ------------------------------------------------------------------ BPE

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        """Split one byte-encoded pre-token into BPE symbols; the last carries ``</w>``."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(parts):
                # Merge every non-overlapping occurrence left to right, as CLIP does.
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def _encode_plain(self, text: str, out: list[int]) -> None:
        for word in _WORD_PATTERN.findall(text):
            encoded = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            out.extend(self._token_to_id[t] for t in self._bpe(encoded))

    # ------------------------------------------------------------------ public API

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after CLIP's cleaning; no start/end tokens are added."""
        ids: list[int] = []
        # Odd pieces of the split are special-token strings (the split pattern is one group).
        for k, piece in enumerate(_SPECIAL_PATTERN.split(clean_text(text))):
            if k % 2:
                ids.append(self._token_to_id[piece])
            elif piece:
                self._encode_plain(piece, ids)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: ``</w>`` becomes a space, specials render as their strings, stripped.

        Punctuation and digits come back space-separated (``"a cat , 2 0"``), as in CLIP.
        """
        pieces: list[str] = []
        pending: list[str] = []

        def flush() -> None:
            if pending:
                raw = bytearray(self._byte_decoder[c] for c in "".join(pending))
                pieces.append(raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " "))
                pending.clear()

        for i in ids:
            token = self.id_to_token(int(i))
            if int(i) in self._special_ids:
                flush()
                pieces.append(f" {token} ")
            else:
                # Decode bytes per run: "</w>" is ASCII, so it survives the byte round trip.
                pending.append(token)
        flush()
        return " ".join("".join(pieces).split())

    def token_to_id(self, token: str) -> int:
        try:
            return self._token_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a token of the CLIP vocabulary") from None

    def id_to_token(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise IndexError(f"token id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self._id_to_token[id]

    def is_special(self, id: int) -> bool:
        return id in self._special_ids

    def words(self, ids: Sequence[int]) -> list[list[int]]:
        """Group token positions of ``ids`` into whole words, for whole-word masking.

        A word ends at a token ending in ``</w>``; every special token is a word of its own. A
        trailing run without ``</w>`` (a word cut off by truncation) is returned as a last word.
        Example: "naïve cat" is 4 tokens ``na ï ve</w> cat</w>`` -> ``[[0, 1, 2], [3]]``.
        """
        groups: list[list[int]] = []
        current: list[int] = []
        for pos, i in enumerate(ids):
            i = int(i)
            if i in self._special_ids:
                if current:
                    groups.append(current)
                    current = []
                groups.append([pos])
                continue
            current.append(pos)
            if self.id_to_token(i).endswith(END_OF_WORD):
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        return groups


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> ClipTokenizer:
    """The process's tokenizer over the vocabulary installed with ``open_clip_torch``."""
    return ClipTokenizer()
