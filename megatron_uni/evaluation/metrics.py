"""Evaluation metrics on plain tensors and token lists: no model, no process groups.

Shape legend: N queries, K candidates, I images (or videos), T texts.

Ties are broken the way a stable descending sort would: among equal scores the candidate with
the lower index ranks first. The rank of a candidate is therefore a function of the score
matrix alone, the same in every process and layout that computes the same scores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
_BLOCK = 1024  # image rows per block of the image -> text ranking


def rank_of(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[N]`` 0-based rank of candidate ``index[n]`` in row ``n`` of ``scores`` ``[N, K]``
    (descending score, ties to the lower index)."""
    index = index.long().clamp(min=0).to(scores.device)
    columns = torch.arange(scores.shape[1], device=scores.device)[None]
    ranks = []
    for start in range(0, scores.shape[0], _BLOCK):  # [block, K] temporaries
        rows, idx = scores[start : start + _BLOCK], index[start : start + _BLOCK, None]
        own = rows.gather(1, idx)
        ranks.append(((rows > own) | ((rows == own) & (columns < idx))).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=scores.device)


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> tuple[dict[int, int], int]:
    """Queries whose label ranks in the top k, per k, and the number of labelled queries.

    ``scores`` [N, K], ``labels`` [N] (IGNORE_INDEX = not counted). A k larger than K counts
    every labelled query as correct.
    """
    valid = labels != IGNORE_INDEX
    count = int(valid.sum())
    if scores.shape[0] == 0 or count == 0:
        return {k: 0 for k in ks}, count
    ranks = rank_of(scores[valid], labels[valid])
    return {k: int((ranks < k).sum()) for k in ks}, count


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` fractions of labelled queries (nan when there are none)."""
    correct, count = topk_correct(scores, labels, ks)
    return {f"top{k}": correct[k] / count if count else math.nan for k in ks}


def recall_at_k(
    similarity: torch.Tensor, text_owner: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Retrieval recall in both directions from an image-text similarity matrix.

    ``similarity`` [I, T]; ``text_owner`` [T] the image each text describes (an image may have
    several texts, each text has one image). image->text R@k: the fraction of images with at
    least one of their texts among their k best texts; text->image R@k: the fraction of texts
    whose image is among their k best images. Returns ``i2t_r{k}`` and ``t2i_r{k}``.
    """
    num_images, num_texts = similarity.shape
    device = similarity.device
    text_owner = text_owner.long().to(device)
    if num_texts and (text_owner.min() < 0 or text_owner.max() >= num_images):
        raise ValueError(f"text_owner must index the {num_images} images")
    out: dict[str, float] = {}
    # image -> text: the rank of each image's best-ranked own text, which is its own text of
    # highest score (the lowest index among equals). Rows in blocks: [block, T] memory.
    i2t = torch.zeros(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, _BLOCK):
        rows = similarity[start : start + _BLOCK]
        images = torch.arange(start, start + rows.shape[0], device=device)
        owns = text_owner[None, :] == images[:, None]
        if not bool(owns.any(1).all()):
            raise ValueError("every image needs at least one text")
        best = rows.masked_fill(~owns, -math.inf).argmax(1)  # first maximum: lowest index
        i2t[start : start + rows.shape[0]] = rank_of(rows, best)
    t2i = rank_of(similarity.t(), text_owner) if num_texts else torch.zeros(0, dtype=torch.long)
    for k in ks:
        out[f"i2t_r{k}"] = int((i2t < k).sum()) / num_images if num_images else math.nan
    for k in ks:
        out[f"t2i_r{k}"] = int((t2i < k).sum()) / num_texts if num_texts else math.nan
    return out


# --------------------------------------------------------------------------------- BLEU
def ngrams(words: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams of ``words``."""
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to the hypothesis length (the shorter one on a tie)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def bleu_statistics(
    hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> list[int]:
    """Sufficient statistics of one sentence: [hyp len, ref len, (clipped matches, total) per n].

    Matches are clipped by the largest count of the n-gram in any one reference; the reference
    length is the closest one (:func:`closest_ref_length`).
    """
    if not references:
        raise ValueError("a hypothesis needs at least one reference")
    stats = [len(hypothesis), closest_ref_length(len(hypothesis), [len(r) for r in references])]
    for n in range(1, max_n + 1):
        hyp = ngrams(hypothesis, n)
        most: Counter = Counter()
        for ref in references:
            for gram, count in ngrams(ref, n).items():
                most[gram] = max(most[gram], count)
        stats.append(sum(min(c, most[g]) for g, c in hyp.items()))
        stats.append(max(len(hypothesis) - n + 1, 0))
    return stats


def bleu_from_statistics(stats: Sequence[float], max_n: int = 4) -> float:
    """Corpus BLEU from summed :func:`bleu_statistics`: brevity penalty times the geometric
    mean of the clipped n-gram precisions; no smoothing (0 when any precision is 0)."""
    hyp_len, ref_len = stats[0], stats[1]
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    for n in range(max_n):
        matches, total = stats[2 + 2 * n], stats[3 + 2 * n]
        if matches == 0 or total == 0:
            return 0.0
        log_precision += math.log(matches / total) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 4,
) -> float:
    """Corpus BLEU-``max_n`` (Papineni et al. 2002) of word lists against reference word lists.

    Statistics are summed over the corpus before the precisions and the brevity penalty are
    formed (not an average of sentence scores). ``references[i]`` are the references of
    ``hypotheses[i]``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    total = [0] * (2 + 2 * max_n)
    for hyp, refs in zip(hypotheses, references):
        for i, value in enumerate(bleu_statistics(hyp, refs, max_n)):
            total[i] += value
    return bleu_from_statistics(total, max_n)


def words(text: str) -> list[str]:
    """Lower-cased whitespace words of a caption (apply the same to hypotheses and references)."""
    return text.lower().split()
