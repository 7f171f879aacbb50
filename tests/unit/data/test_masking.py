"""Whole-word masking: whole words only, BERT's count, 80/10/10 per word."""

from __future__ import annotations

import numpy as np

from megatron_uni.batch import IGNORE_INDEX
from megatron_uni.data.masking import whole_word_mask
from megatron_uni.data.text_tokenizer import get_tokenizer

# Long multi-token words, so that "whole word" is actually tested.
TEXT = ("supercalifragilisticexpialidocious antidisestablishmentarianism is a naive résumé of "
        "unbelievably extraordinary circumstances in the neighbourhood of pneumonoultramicroscopic")
RANDOM_IDS = list(range(1000, 1010))


def test_masks_whole_words_with_berts_count() -> None:
    tok = get_tokenizer()
    ids = tok.encode(TEXT)
    words = tok.words(ids)
    assert any(len(w) > 1 for w in words)
    for seed in range(50):
        inputs, labels = whole_word_mask(ids, tok, mask_prob=0.15, random_ids=RANDOM_IDS,
                                         rng=np.random.default_rng(seed))
        assert len(inputs) == len(labels) == len(ids)
        chosen = [w for w in words if labels[w[0]] != IGNORE_INDEX]
        assert len(chosen) == max(1, round(0.15 * len(words)))
        for w in words:
            flags = {labels[p] != IGNORE_INDEX for p in w}
            assert len(flags) == 1, "a word is masked whole or not at all"
        for p, (i, lab) in enumerate(zip(inputs, labels)):
            if lab == IGNORE_INDEX:
                assert i == ids[p]
            else:
                assert lab == ids[p]


def test_80_10_10_per_word() -> None:
    tok = get_tokenizer()
    ids = tok.encode(TEXT)
    words = tok.words(ids)
    actions = {"mask": 0, "random": 0, "keep": 0}
    for seed in range(2000):
        inputs, labels = whole_word_mask(ids, tok, mask_prob=0.15, random_ids=RANDOM_IDS,
                                         rng=np.random.default_rng(seed))
        for w in words:
            if labels[w[0]] == IGNORE_INDEX:
                continue
            got = [inputs[p] for p in w]
            if all(g == tok.spe_id for g in got):  # the reference's mask token
                actions["mask"] += 1
            elif all(g in RANDOM_IDS for g in got):
                actions["random"] += 1
            else:
                assert got == [ids[p] for p in w]
                actions["keep"] += 1
    total = sum(actions.values())
    assert abs(actions["mask"] / total - 0.8) < 0.03
    assert abs(actions["random"] / total - 0.1) < 0.02
    assert abs(actions["keep"] / total - 0.1) < 0.02


def test_specials_are_never_masked_and_empty_text() -> None:
    tok = get_tokenizer()
    ids = [tok.spe_id, *tok.encode("red circle"), tok.eot_id]
    for seed in range(30):
        inputs, labels = whole_word_mask(ids, tok, mask_prob=0.9, random_ids=RANDOM_IDS,
                                         rng=np.random.default_rng(seed))
        assert labels[0] == labels[-1] == IGNORE_INDEX
        assert inputs[0] == tok.spe_id and inputs[-1] == tok.eot_id
    assert whole_word_mask([], tok, mask_prob=0.15, random_ids=RANDOM_IDS,
                           rng=np.random.default_rng(0)) == ([], [])
