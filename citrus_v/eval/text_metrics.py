"""Text metrics for reports and open questions, on one written-down tokenisation.

**Tokenisation** (:func:`tokenize`): Unicode NFKC, lower case; each CJK character is one token; otherwise
tokens are maximal runs of letters and digits (``[^\\W_]+``), so punctuation and underscores separate and
vanish ("T2-hyperintense, 12.5 mm" → ``t2 hyperintense 12 5 mm``). On ASCII text this is exactly
rouge-score's tokeniser without stemming.

**Report metrics** (hypothesis = the model's answer span, one reference per sample):

- BLEU-n (n = 1..4), corpus level as in the COCO caption toolkit: clipped n-gram matches and counts are
  summed over the corpus, p_k = matches_k / counts_k, the brevity penalty uses the summed hypothesis length
  c and the summed closest reference length r (BP = 1 if c > r else exp(1 − r / c)); BLEU-n = BP · exp(mean
  of log p_1..p_n); 0 when any p_k is 0 (no smoothing).
- ROUGE-L: per sample, the longest common subsequence of the token lists; P = LCS / |hyp|, R = LCS / |ref|,
  F = 2PR / (P + R) (β = 1, rouge-score's F-measure); the mean of F over samples.
- METEOR: NLTK's ``single_meteor_score`` per sample (α 0.9, β 3, γ 0.5) on the tokens, with exact and
  Porter-stem matching; WordNet synonym matching is off (WordNet is not shipped), so scores can be slightly
  lower than the Java METEOR 1.5; the mean over samples.
- CIDEr (CIDEr-D, as the COCO caption toolkit computes it): n-grams n = 1..4 weighted by TF-IDF with the
  document frequency taken over the references of the evaluated set, cosine similarity per n with
  clipping, a Gaussian length penalty (σ = 6, lengths counted in bigrams as the toolkit does), averaged
  over n, times 10; the mean over samples. The document frequencies are a property of the whole corpus: a
  subset of it (one group of a report) is scored with the whole set's (``corpus``), never its own.

**Open questions**: token recall = |common| / |reference tokens| and token F1 (SQuAD style) on bags of
tokens, after removing the articles a/an/the; an empty reference scores 1 only for an empty answer.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_ARTICLES = {"a", "an", "the"}


def tokenize(text: str) -> list[str]:
    """The tokens of ``text`` (see the module docstring)."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


# --- open questions ------------------------------------------------------------------------------------------
def token_recall_f1(prediction: str, reference: str) -> tuple[float, float]:
    """``(recall, F1)`` of the answer's tokens against the reference's (bags of tokens, articles removed)."""
    pred = [t for t in tokenize(prediction) if t not in _ARTICLES]
    ref = [t for t in tokenize(reference) if t not in _ARTICLES]
    if not ref:
        score = 1.0 if not pred else 0.0
        return score, score
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0
    recall, precision = common / len(ref), common / len(pred)
    return recall, 2 * precision * recall / (precision + recall)


# --- BLEU ----------------------------------------------------------------------------------------------------
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_n: int = 4) -> list[float]:
    """``[BLEU-1, …, BLEU-max_n]`` of tokenised hypotheses, each with one or more tokenised references."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matches, counts = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        # closest reference length, the shorter one on ties
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1] if refs else 0
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(hyp, n)
            best: Counter = Counter()
            for ref in refs:
                best |= _ngrams(ref, n)
            matches[n - 1] += sum((hyp_counts & best).values())
            counts[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0:
        return [0.0] * max_n
    penalty = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matches[n] == 0 or counts[n] == 0:
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(matches[n] / counts[n])
        scores.append(penalty * math.exp(log_sum / (n + 1)))
    return scores


# --- ROUGE-L -------------------------------------------------------------------------------------------------
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str], beta: float = 1.0) -> float:
    """ROUGE-L F-measure of two token lists (β = 1 by default, as rouge-score)."""
    if not hypothesis or not reference:
        return 0.0
    lcs = lcs_length(hypothesis, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


# --- METEOR --------------------------------------------------------------------------------------------------
class _NoSynonyms:
    """Stands in for NLTK's WordNet reader: no synonyms (WordNet data is not shipped)."""

    def synsets(self, *args, **kwargs) -> list:
        return []


def meteor(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """NLTK METEOR of two token lists, exact and Porter-stem matching (no WordNet synonyms)."""
    from nltk.translate.meteor_score import single_meteor_score

    if not hypothesis or not reference:
        return 0.0
    return float(single_meteor_score(list(reference), list(hypothesis), preprocess=str, wordnet=_NoSynonyms()))


# --- CIDEr-D -------------------------------------------------------------------------------------------------
def _cider_grams(tokens: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(_ngrams(tokens, k))
    return counts


def cider_document_frequency(references: Sequence[Sequence[Sequence[str]]], n: int = 4) -> tuple[Counter, int]:
    """``(document frequency of each n-gram, number of documents)`` over reference sets: CIDEr's IDF corpus."""
    document_frequency: Counter = Counter()
    for refs in references:
        document_frequency.update({gram for ref in refs for gram in _cider_grams(ref, n)})
    return document_frequency, len(references)


def cider_d(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
            n: int = 4, sigma: float = 6.0, corpus: tuple[Counter, int] | None = None) -> tuple[float, list[float]]:
    """``(mean, per-sample scores)`` of CIDEr-D (the COCO caption toolkit's definition, ×10).

    ``corpus`` (from :func:`cider_document_frequency`) gives the document frequencies when the samples are
    part of a larger evaluated set; by default they are taken over ``references``.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return 0.0, []
    hyp_counts = [_cider_grams(h, n) for h in hypotheses]
    ref_counts = [[_cider_grams(r, n) for r in refs] for refs in references]
    document_frequency, documents = corpus if corpus is not None else cider_document_frequency(references, n)
    log_docs = math.log(float(documents))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            value = float(tf) * (log_docs - math.log(max(1.0, document_frequency[gram])))
            vec[k][gram] = value
            norm[k] += value * value
            if k == 1:  # the toolkit counts the length in bigrams
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts, strict=True):
        h_vec, h_norm, h_len = vector(hyp)
        total = 0.0
        for ref in refs:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            sims = []
            for k in range(n):
                value = sum(min(v, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, v in h_vec[k].items())
                if h_norm[k] != 0 and r_norm[k] != 0:
                    value /= h_norm[k] * r_norm[k]
                sims.append(value * penalty)
            total += sum(sims) / n
        scores.append(10.0 * total / len(refs) if refs else 0.0)
    return sum(scores) / len(scores), scores
