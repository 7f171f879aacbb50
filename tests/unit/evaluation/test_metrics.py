"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_uni.evaluation.metrics import (
    IGNORE_INDEX,
    bleu_statistics,
    closest_ref_length,
    corpus_bleu,
    rank_of,
    recall_at_k,
    topk_accuracy,
    topk_correct,
    words,
)


# ----------------------------------------------------------------------------- top-k
def test_topk_on_a_hand_made_score_matrix() -> None:
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, -0.1],  # label 0 ranks 0
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, -0.1],  # label 2 ranks 1
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, -0.1],  # label 5 ranks 5
        [0.9, 0.1, 0.5, 0.3, 0.2, 0.0, -0.1],  # label 6 ranks 6
    ])
    labels = torch.tensor([0, 2, 5, 6])
    assert rank_of(scores, labels).tolist() == [0, 1, 5, 6]
    correct, count = topk_correct(scores, labels, (1, 5))
    assert (correct, count) == ({1: 1, 5: 2}, 4)
    assert topk_accuracy(scores, labels) == {"top1": 0.25, "top5": 0.5}


def test_topk_ignores_unlabelled_queries_and_clips_k() -> None:
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    labels = torch.tensor([1, IGNORE_INDEX, 0])
    assert topk_correct(scores, labels, (1, 5)) == ({1: 2, 5: 2}, 2)
    empty = topk_accuracy(scores, torch.full((3,), IGNORE_INDEX))
    assert all(math.isnan(v) for v in empty.values())


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5]])
    assert rank_of(scores.expand(3, 3), torch.tensor([0, 1, 2])).tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- recall
def test_recall_both_directions_on_a_hand_made_similarity_matrix() -> None:
    # 3 images, 5 texts; texts 0,1 describe image 0, text 2 image 1, texts 3,4 image 2.
    owner = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([
        #  t0    t1    t2    t3    t4
        [0.1, 0.8, 0.9, 0.0, 0.2],  # image 0: best own text t1 ranks 1 (after t2)
        [0.7, 0.1, 0.2, 0.3, 0.6],  # image 1: own t2 ranks 3 (after t0, t4, t3)
        [0.5, 0.1, 0.0, 0.4, 0.3],  # image 2: own t3 ranks 1 (after t0)
    ])
    r = recall_at_k(sim, owner, ks=(1, 2, 4))
    # i2t ranks [1, 3, 1]
    assert r["i2t_r1"] == 0.0
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r4"] == 1.0
    # t2i: columns; t0 -> image 0 scores (0.1, 0.7, 0.5): rank 2; t1 -> (0.8, .1, .1): 0;
    # t2 -> image 1 (0.9, 0.2, 0.0): 1; t3 -> image 2 (0.0, 0.3, 0.4): 0;
    # t4 -> image 2 (0.2, 0.6, 0.3): 1.  ranks [2, 0, 1, 0, 1]
    assert r["t2i_r1"] == pytest.approx(2 / 5)
    assert r["t2i_r2"] == pytest.approx(4 / 5)
    assert r["t2i_r4"] == 1.0
    assert list(r) == ["i2t_r1", "i2t_r2", "i2t_r4", "t2i_r1", "t2i_r2", "t2i_r4"]


def test_recall_identity_is_perfect_and_reversed_is_last() -> None:
    n = 12
    eye = torch.eye(n)
    assert set(recall_at_k(eye, torch.arange(n)).values()) == {1.0}
    anti = -eye  # every true pair is the worst match: rank n-1
    r = recall_at_k(anti, torch.arange(n), ks=(1, 11, 12))
    assert r["i2t_r11"] == 0.0 and r["t2i_r11"] == 0.0
    assert r["i2t_r12"] == 1.0 and r["t2i_r12"] == 1.0


def test_recall_needs_a_text_per_image() -> None:
    with pytest.raises(ValueError, match="at least one text"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- BLEU
def _bleu(hyps: list[str], refs: list[list[str]]) -> float:
    return corpus_bleu([words(h) for h in hyps], [[words(r) for r in rs] for rs in refs])


def test_bleu_identical_is_one() -> None:
    assert _bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_bleu_statistics_by_hand() -> None:
    # hyp "the cat is on the mat" vs ref "the cat sat on the mat":
    # 1-grams 5/6 (the x2, cat, on, mat), 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3.
    stats = bleu_statistics(words("the cat is on the mat"), [words("the cat sat on the mat")])
    assert stats == [6, 6, 5, 6, 3, 5, 1, 4, 0, 3]
    # No smoothing: a zero 4-gram precision makes BLEU-4 zero.
    assert _bleu(["the cat is on the mat"], [["the cat sat on the mat"]]) == 0.0


def test_bleu_brevity_penalty() -> None:
    # Every n-gram of the 5-word hypothesis is in the 6-word reference: precision 1,
    # BP = exp(1 - 6/5).
    score = _bleu(["the cat sat on the"], [["the cat sat on the mat"]])
    assert score == pytest.approx(math.exp(1 - 6 / 5))
    assert score == pytest.approx(0.8187307531)
    # Longer than the reference: no penalty (precisions 6/7, 5/6, 4/5, 3/4).
    longer = _bleu(["the cat sat on the mat today"], [["the cat sat on the mat"]])
    assert longer == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)


def test_bleu_clips_counts_by_the_references() -> None:
    stats = bleu_statistics(words("the the the the"), [words("the cat"), words("the the dog")])
    assert stats[2:4] == [2, 4]  # "the" counts at most twice (the second reference)


def test_bleu_is_a_corpus_statistic_not_a_mean_of_sentences() -> None:
    hyps = ["a b c d e", "a b c d x y"]
    refs = [["a b c d e"], ["a b c d z w"]]
    # Summed: lengths 11/11; precisions 9/11, 7/9, 5/7, 3/5 -> product 3/11.
    assert _bleu(hyps, refs) == pytest.approx((3 / 11) ** 0.25)
    sentence_mean = (1.0 + (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25) / 2
    assert _bleu(hyps, refs) != pytest.approx(sentence_mean)


def test_bleu_uses_the_closest_reference_length() -> None:
    assert closest_ref_length(5, [4, 7]) == 4
    assert closest_ref_length(5, [6, 4]) == 4  # a tie goes to the shorter
    assert closest_ref_length(5, [9, 6]) == 6
    # Closest reference 6 words (the 9-word one is ignored): BP = exp(1 - 6/5).
    score = _bleu(["a b c d e"], [["a b c d e f g h i", "a b c d e f"]])
    assert score == pytest.approx(math.exp(1 - 6 / 5))


def test_bleu_edge_cases() -> None:
    assert _bleu([""], [["a b c d"]]) == 0.0
    assert _bleu([], []) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu([["a"]], [])


# --------------------------------------------------------------------------- CIDEr-D
# The hand computation follows coco-caption's CIDEr-D: per n, tf-idf vectors with idf =
# log(#images) - log(max(1, df)), df = images whose references hold the n-gram; clipped dot
# product min(h, r) * r over |h| |r|; Gaussian length penalty on the bigram counts, sigma 6;
# mean over n = 1..4, mean over references, x10; corpus = mean over images.
def _cider(hyps: list[str], refs: list[list[str]]) -> tuple[float, list[float]]:
    from megatron_uni.evaluation.metrics import cider_d

    return cider_d([words(h) for h in hyps], [[words(r) for r in rs] for rs in refs])


def test_cider_idf_zero_for_ngrams_in_every_image() -> None:
    # 'a' is in both images' references: df 2, idf log 2 - log 2 = 0, so it carries no weight.
    # Image 1: 1-grams h = {a: 0, cat: L}, r the same -> L*L / (L * L) = 1; 2-gram 'a cat':
    # idf log 2 - log 1 = L -> 1; no 3- or 4-grams (norm 0 -> 0). Equal lengths: penalty 1.
    # (1 + 1 + 0 + 0) / 4 / 1 reference * 10 = 5; image 2 is the same.
    corpus, per = _cider(["a cat", "a dog"], [["a cat"], ["a dog"]])
    assert per == pytest.approx([5.0, 5.0]) and corpus == pytest.approx(5.0)


def test_cider_two_references_and_length_penalty() -> None:
    # Every n-gram below occurs in one image's references only (or none: df 0 -> max(1, 0) = 1),
    # so every idf is L = log 2 and it cancels in the cosines.
    pen = math.exp(-1 / (2 * 6.0**2))  # bigram counts differ by one
    # image 1, hyp 'a cat' (1 bigram). ref 'a cat sits' (2 bigrams): 1-grams 2 L^2 / (L sqrt2 *
    # L sqrt3) = 2/sqrt6, 2-grams L^2 / (L * L sqrt2) = 1/sqrt2, 3-gram: hyp norm 0 -> 0.
    # ref 'a cat': 1 and 1, penalty 1.
    image1 = (pen * (2 / math.sqrt(6) + 1 / math.sqrt(2)) + (1 + 1)) / 4 / 2 * 10
    # image 2, hyp 'dog' (0 bigrams) vs 'dog runs' (1 bigram): 1-grams L^2 / (L * L sqrt2).
    image2 = pen * (1 / math.sqrt(2)) / 4 / 1 * 10
    corpus, per = _cider(["a cat", "dog"], [["a cat sits", "a cat"], ["dog runs"]])
    assert per == pytest.approx([image1, image2])
    assert corpus == pytest.approx((image1 + image2) / 2)


def test_cider_clips_repeated_words() -> None:
    # hyp 'cat cat cat' (2 bigrams) vs 'a cat' (1 bigram), 'a' with idf 0 as above.
    # 1-grams: h = {cat: 3L}, r = {a: 0, cat: L}: min(3L, L) * L / (3L * L) = 1/3 (not 1);
    # 2-grams: 'cat cat' vs 'a cat' share nothing -> 0.
    pen = math.exp(-1 / (2 * 6.0**2))
    corpus, per = _cider(["cat cat cat", "a dog"], [["a cat"], ["a dog"]])
    assert per[0] == pytest.approx(pen * (1 / 3) / 4 * 10)
    assert per[1] == pytest.approx(5.0)


def test_cider_rejects_mismatched_input() -> None:
    from megatron_uni.evaluation.metrics import cider_d

    with pytest.raises(ValueError):
        cider_d([["a"]], [])
    with pytest.raises(ValueError, match="reference"):
        cider_d([["a"]], [[]])
    assert math.isnan(cider_d([], [])[0])
