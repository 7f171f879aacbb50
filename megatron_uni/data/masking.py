"""Whole-word masking for masked language modelling (BERT's rule on CLIP BPE words).

``max(1, round(mask_prob * words))`` words of a text are chosen (BERT's count); every token of a
chosen word becomes a query with its original id as label, and its input is the mask token for 80%
of the chosen words, a random token of ``random_ids`` for 10%, unchanged for 10% (the decision is
per word, so a word is never half masked). Special tokens are never chosen.

The mask token is ``<|spe|>``, as in the reference (``DATALOADER.MASK_BPE_WORD`` defaults to
``spe``, ``uniperceiver/datasets/task_dataset/general_corpus.py`` ``random_word_wwm``; no released
config overrides it, so an imported checkpoint learned MLM with ``<|spe|>`` masks). It is embedded as ordinary text (position and
type), unlike a sequence's leading ``<SPE>`` (see ``models/embeddings.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_uni.batch import IGNORE_INDEX
from megatron_uni.data.text_tokenizer import ClipTokenizer


def whole_word_mask(
    ids: Sequence[int],
    tokenizer: ClipTokenizer,
    *,
    mask_prob: float,
    random_ids: Sequence[int],
    rng: np.random.Generator,
) -> tuple[list[int], list[int]]:
    """Returns (input ids with masks applied, labels: original id where chosen, else
    ``IGNORE_INDEX``), both as long as ``ids``."""
    inputs = [int(i) for i in ids]
    labels = [IGNORE_INDEX] * len(inputs)
    words = [w for w in tokenizer.words(inputs) if not tokenizer.is_special(inputs[w[0]])]
    if not words:
        return inputs, labels
    count = min(len(words), max(1, round(mask_prob * len(words))))
    for w in sorted(rng.choice(len(words), size=count, replace=False)):
        action = rng.random()
        for pos in words[int(w)]:
            labels[pos] = inputs[pos]
            if action < 0.8:
                inputs[pos] = tokenizer.spe_id  # the reference's mask token
            elif action < 0.9:
                inputs[pos] = int(random_ids[int(rng.integers(len(random_ids)))])
    return inputs, labels
