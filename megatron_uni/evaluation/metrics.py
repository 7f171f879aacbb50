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


# ------------------------------------------------------------------------------- CIDEr-D
def _tfidf(
    counts: Counter, document_frequency: Counter, log_num_images: float, max_n: int
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """tf-idf vectors per n of one sentence's n-gram ``counts``, their norms, and its length.

    The length is the sentence's bigram count, as in coco-caption's CIDEr-D (its ``n == 1``
    branch counts 2-grams), so the length penalty sees word counts minus one.
    """
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        idf = log_num_images - math.log(max(1.0, document_frequency[gram]))
        vectors[n][gram] = tf * idf
        norms[n] += (tf * idf) ** 2
        if n == 1:
            length += tf
    return vectors, [math.sqrt(v) for v in norms], length


def _all_ngrams(sentence: Sequence[str], max_n: int) -> Counter:
    out: Counter = Counter()
    for n in range(1, max_n + 1):
        out.update(ngrams(sentence, n))
    return out


def cider_d(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it) of word lists: the corpus
    score and one score per hypothesis.

    Per n in 1..max_n, each sentence is a tf-idf vector of its n-grams; the document frequency
    of an n-gram is the number of images with it in any of their references, and the idf is
    log(images) - log(max(1, df)). The hypothesis' entries are clipped to the reference's
    (min(h, r) * r), the dot product divided by both norms and multiplied by the Gaussian
    length penalty exp(-delta^2 / (2 sigma^2)); the n's are averaged, the references averaged,
    times 10. The corpus score is the mean over hypotheses. The document frequencies come from
    the whole set, so call it on every caption at once (not per shard or rank).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return math.nan, []
    ref_counts = [[_all_ngrams(r, max_n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for counts in ref_counts:
        if not counts:
            raise ValueError("a hypothesis needs at least one reference")
        document_frequency.update(set().union(*counts))
    log_num_images = math.log(float(len(references)))
    scores = []
    for hyp, counts in zip(hypotheses, ref_counts):
        vec_h, norm_h, len_h = _tfidf(_all_ngrams(hyp, max_n), document_frequency,
                                      log_num_images, max_n)
        total = [0.0] * max_n
        for ref in counts:
            vec_r, norm_r, len_r = _tfidf(ref, document_frequency, log_num_images, max_n)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                value = sum(min(h, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0)
                            for g, h in vec_h[n].items())
                if norm_h[n] != 0 and norm_r[n] != 0:
                    value /= norm_h[n] * norm_r[n]
                total[n] += value * penalty
        scores.append(sum(total) / max_n / len(counts) * 10.0)
    return sum(scores) / len(scores), scores
