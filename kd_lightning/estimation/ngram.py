"""n-gram prior over a teacher corpus (Bayesian closed-source KD, arXiv 2401.07013).

For a response token ``w*`` with context ``c`` (the previous ``order - 1`` tokens)::

    p_prior(w) = (1/γ) · #(c, w) / #(c)  +  (1 - 1/γ) · [w = w*]

Counting is vectorised numpy, one sort per order (:mod:`~kd_lightning.estimation.ngram_counts`). With a
``memory_budget`` the same counts are made in parts spilled to disk
(:mod:`~kd_lightning.estimation.ngram_external`), and the prior is the same to the bit.

Context and backoff rules:

* A sequence is left-padded with a start symbol (an id outside the vocabulary), so every position has a
  full context of ``order - 1`` symbols and the first response tokens are conditioned on their prompt.
* Only response tokens are counted as events (``count_mask``); contexts may include prompt tokens.
* Backoff: if ``#(c) < min_context_count`` at order ``n`` (always so for a context never seen in the
  counted corpus, e.g. when applying counts to held-out text), use the longest shorter context
  ``c[-(k-1):]``, ``k = n-1, ..., 1`` that passes; order 1 (unigram over all counted tokens) always passes.
  Shorter orders are counted lazily, only when some position needs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_lightning.data.soft_labels import SparseRows, id_dtype_for
from kd_lightning.estimation.ngram_counts import count_order
from kd_lightning.estimation.ngram_external import parse_bytes
from kd_lightning.estimation.ngram_model import NGramModel, NGramRows

__all__ = ["NGramModel", "NGramPriorEstimator", "NGramRows", "count_order", "mix_prior"]


def mix_prior(ngram: SparseRows, observed: np.ndarray, gamma: float | np.ndarray) -> SparseRows:
    """``(1/γ)·p_ngram + (1 - 1/γ)·onehot(observed)`` on sparse rows that contain the observed id.

    ``gamma`` is one number or one per row (:attr:`NGramPriorEstimator.gamma_by_count`). Rows are re-sorted by
    probability (descending) and stored as float16 / float32 tail.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    if (gamma < 1).any():
        raise ValueError(
            f"gamma must be >= 1 (gamma=1 is the pure n-gram distribution), got {float(gamma.min())}"
        )
    gamma_rows = gamma[:, None] if gamma.ndim else gamma
    probs = np.asarray(ngram.probs, dtype=np.float64) / gamma_rows
    hit = np.asarray(ngram.ids).astype(np.int64) == np.asarray(observed, dtype=np.int64)[:, None]
    first_hit = hit & (np.cumsum(hit, axis=1) == 1)
    if not first_hit.any(1).all():
        raise ValueError("every row must contain its observed token (NGramModel.distributions guarantees it)")
    probs = probs + first_hit * (1.0 - 1.0 / gamma_rows)
    order = np.argsort(-probs, axis=1, kind="stable")
    ids = np.take_along_axis(np.asarray(ngram.ids), order, axis=1)
    probs = np.take_along_axis(probs, order, axis=1)
    tail = np.asarray(ngram.tail, dtype=np.float64) / gamma
    return SparseRows(ids, probs.astype(np.float16), tail.astype(np.float32))


SMOOTHINGS = ("ngram", "unigram", "uniform")
"""What the prior mixes with the observed token (``smoothing``): the n-gram, the corpus unigram, or uniform."""


class NGramPriorEstimator:
    """Builds the prior soft labels for every target position of a tokenised corpus.

    Args:
        ngram_order: n of the n-gram (the paper found 5 good and very large n worse).
        gamma: smoothing γ ≥ 1; 1 = pure n-gram, ∞ = one-hot of the observed token.
        min_context_count: back off to shorter contexts seen fewer times than this.
        top_k: entries stored per position (the observed token is always among them).
        smoothing: what gets the ``1/γ`` beside the observed token: ``ngram`` (the prior of the paper),
            ``unigram`` (the counted tokens' frequencies, no context) or ``uniform`` (over the vocabulary).
            At one γ all three put the same ``1 − 1/γ`` on the observed token, so comparing them isolates
            what the n-gram's context adds (label smoothing at equal mass). A sparse row keeps ``top_k``
            entries and one tail bucket, so uniform smoothing is the cap on the observed token alone.
        gamma_by_count: m ≥ 0: a context counted n(c) times gets ``γ·(1 + m / n(c))``, so the n-gram's share
            ``1/γ`` shrinks by ``n(c) / (n(c) + m)`` where the evidence is thin (0: one γ everywhere).
        memory_budget, count_workers, spill_dir: how counting runs (see :class:`NGramModel`). They do not
            change the prior, so they are not in :meth:`settings` (nor in a store's cache key).

    The prior store carries, per position, the count of the context used (``context_count``) and the order
    backed off to (``ngram_order``), which ``weighting=prior_reliability`` reads.
    """

    def __init__(
        self,
        ngram_order: int = 5,
        gamma: float = 2.0,
        min_context_count: int = 1,
        top_k: int = 32,
        smoothing: str = "ngram",
        gamma_by_count: float = 0.0,
        memory_budget: int | str | None = None,
        count_workers: int = 1,
        spill_dir: str | Path | None = None,
    ) -> None:
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if smoothing not in SMOOTHINGS:
            raise ValueError(
                f"estimator.prior.smoothing must be one of {', '.join(SMOOTHINGS)}, got {smoothing!r}"
            )
        if not gamma_by_count >= 0:
            raise ValueError(f"estimator.prior.gamma_by_count must be >= 0 (0: off), got {gamma_by_count}")
        self.ngram_order = ngram_order
        self.gamma = gamma
        self.min_context_count = min_context_count
        self.top_k = top_k
        self.smoothing = smoothing
        self.gamma_by_count = float(gamma_by_count)
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        self.count_workers = count_workers
        self.spill_dir = spill_dir

    def with_changes(self, **changes) -> NGramPriorEstimator:
        """A new estimator with these settings changed, checked like any other (e.g. another n or γ)."""
        arguments = {
            "ngram_order": self.ngram_order,
            "gamma": self.gamma,
            "min_context_count": self.min_context_count,
            "top_k": self.top_k,
            "smoothing": self.smoothing,
            "gamma_by_count": self.gamma_by_count,
            "memory_budget": self.memory_budget,
            "count_workers": self.count_workers,
            "spill_dir": self.spill_dir,
        }
        return type(self)(**{**arguments, **changes})

    def settings(self) -> dict:
        return {
            "kind": "ngram_prior",
            "ngram_order": self.ngram_order,
            "gamma": self.gamma,
            "min_context_count": self.min_context_count,
            "top_k": self.top_k,
            "smoothing": self.smoothing,
            "gamma_by_count": self.gamma_by_count,
            "channels": 1,  # the store carries context counts and orders (stores of 0.1 did not)
        }

    def estimate(self, corpus, vocab_size: int, count_corpus=None) -> tuple[SparseRows, dict]:
        """Prior rows for the target positions of ``corpus`` (counts from ``count_corpus``, default itself).

        Returns the rows and statistics (orders used, mean mass on the observed token).
        """
        rows, stats, _ = self.estimate_with_channels(corpus, vocab_size, count_corpus)
        return rows, stats

    def estimate_with_channels(
        self, corpus, vocab_size: int, count_corpus=None
    ) -> tuple[SparseRows, dict, dict[str, np.ndarray]]:
        """:meth:`estimate`, and per position the context count and order (the store's channels)."""
        counted = count_corpus if count_corpus is not None else corpus
        response = np.roll(counted.target_mask(), 1)  # token p is a response token iff p - 1 is a target
        events = np.flatnonzero(corpus.target_mask()) + 1
        observed = corpus.tokens[events]
        if self.smoothing == "uniform":
            found = uniform_rows(observed, vocab_size, self.top_k, int(response.sum()))
        else:
            order = self.ngram_order if self.smoothing == "ngram" else 1
            model = NGramModel(
                order,
                vocab_size,
                self.min_context_count,
                self.memory_budget,
                self.count_workers,
                self.spill_dir,
            )
            try:
                model.fit(counted.tokens, counted.offsets, response)
                found = model.distributions(corpus.tokens, corpus.offsets, events, self.top_k)
            finally:
                model.close()
        ngram, orders, context_counts = found
        gamma: float | np.ndarray = self.gamma
        if self.gamma_by_count > 0:
            gamma = self.gamma * (1.0 + self.gamma_by_count / np.maximum(context_counts, 1))
        prior = mix_prior(ngram, observed, gamma)
        ngram_observed = (
            np.where(np.asarray(ngram.ids).astype(np.int64) == observed[:, None], ngram.probs, 0)
        ).sum(1)
        stats = {
            "positions": len(events),
            "smoothing": self.smoothing,
            "order_histogram": {int(k): int(v) for k, v in zip(*np.unique(orders, return_counts=True))},
            "mean_ngram_prob_of_observed": float(ngram_observed.mean()),
            "fraction_one_hot_ngram": float((ngram_observed > 0.999).mean()),
            "median_context_count": float(np.median(context_counts)) if len(context_counts) else 0.0,
            "mean_gamma": float(np.mean(gamma)),
        }
        channels = {
            "context_count": context_counts.astype(np.float32),
            "ngram_order": orders.astype(np.float32),
        }
        return prior, stats, channels


def uniform_rows(observed: np.ndarray, vocab_size: int, top_k: int, counted: int) -> NGramRows:
    """The uniform distribution over the vocabulary as sparse rows holding the observed id (1/V) and the
    rest in the tail; order 0 and, as "context" count, the number of counted tokens (it has no context)."""
    n = len(observed)
    ids = np.zeros((n, top_k), dtype=id_dtype_for(vocab_size))
    probs = np.zeros((n, top_k), dtype=np.float64)
    ids[:, 0], probs[:, 0] = observed, 1.0 / vocab_size
    tail = np.full(n, 1.0 - 1.0 / vocab_size)
    return NGramRows(SparseRows(ids, probs, tail), np.zeros(n, dtype=np.int16), np.full(n, counted, np.int64))
