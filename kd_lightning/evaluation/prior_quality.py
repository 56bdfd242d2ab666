"""How good is the n-gram prior on teacher text it never counted, and how much text does it need?

For each order n and each amount of counted teacher text (the first records of the training split up to
that many response tokens), the n-gram model is fitted and queried at every held-out response token:

* **top-1 agreement**: the n-gram's most likely next token is the one the teacher wrote;
* **mass on the observed token**: ``p_ngram(observed | context)`` (0 where the context never saw it);
* **per-token NLL**: ``−log((1 − λ)·p_ngram(observed) + λ·p_unigram(observed))``, with the add-one unigram
  of the counted text at ``λ`` = :data:`UNIGRAM_FLOOR` so an unseen continuation costs a finite amount;
* **coverage**: the share of held-out tokens with ``p_ngram(observed) > 0``.

This is the n-gram part of the prior (γ = 1); the prior a student is trained on mixes it with the one-hot
of the observed token, which cannot be scored on text whose token it already names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.ngram import NGramModel

UNIGRAM_FLOOR = 0.01
"""λ of the unigram floor in the held-out NLL."""


@dataclass
class PriorQualitySpec:
    """What ``kdl prior-quality`` measures (``conf/prior-quality.yaml``)."""

    ngram_orders: list[int] = field(default_factory=lambda: [3, 5])
    """n of each n-gram model."""
    counted_tokens: list[int | None] = field(default_factory=lambda: [50_000, 1_000_000, None])
    """Response tokens counted (the first training records up to that many); null: all of them."""
    min_context_count: int = 2
    """Backoff threshold, as estimator.prior.min_context_count."""
    top_k: int = 32
    memory_budget: str | None = "2GiB"
    """Counting within this much memory (the prior is the same to the bit)."""

    def __post_init__(self) -> None:
        self.ngram_orders = [int(n) for n in self.ngram_orders]
        if not self.ngram_orders or min(self.ngram_orders) < 1:
            raise ValueError("prior_quality.ngram_orders must be a non-empty list of orders >= 1")
        if any(c is not None and int(c) < 1 for c in self.counted_tokens):
            raise ValueError("prior_quality.counted_tokens must be positive token counts (or null: all)")


def first_tokens(corpus: TokenizedCorpus, tokens: int | None) -> TokenizedCorpus:
    """The first records of ``corpus`` whose response tokens reach ``tokens`` (all of it for None)."""
    if tokens is None:
        return corpus
    counts = np.diff(corpus.target_offsets())
    n = int(np.searchsorted(np.cumsum(counts), tokens) + 1)
    n = min(n, len(corpus))
    end = int(corpus.offsets[n])
    return TokenizedCorpus(corpus.tokens[:end], corpus.offsets[: n + 1].copy(), corpus.prompt_lens[:n].copy())


def score_prior(
    counted: TokenizedCorpus, heldout: TokenizedCorpus, vocab_size: int, order: int, spec: PriorQualitySpec
) -> dict[str, float]:
    """One row of the table: the n-gram of ``order`` counted on ``counted``, scored on ``heldout``."""
    start = time.perf_counter()
    response = np.roll(counted.target_mask(), 1)
    model = NGramModel(order, vocab_size, spec.min_context_count, spec.memory_budget)
    try:
        model.fit(counted.tokens, counted.offsets, response)
        events = np.flatnonzero(heldout.target_mask()) + 1
        rows, orders, _ = model.distributions(heldout.tokens, heldout.offsets, events, spec.top_k)
    finally:
        model.close()
    observed = heldout.tokens[events].astype(np.int64)
    ids = np.asarray(rows.ids).astype(np.int64)
    probs = np.asarray(rows.probs, dtype=np.float64)
    on_observed = np.where(ids == observed[:, None], probs, 0.0).sum(1)
    top1 = ids[np.arange(len(ids)), probs.argmax(1)] == observed
    unigram = np.bincount(counted.tokens[response], minlength=vocab_size).astype(np.float64) + 1.0
    unigram /= unigram.sum()
    mixed = (1.0 - UNIGRAM_FLOOR) * on_observed + UNIGRAM_FLOOR * unigram[observed]
    return {
        "ngram_order": order,
        "counted_tokens": int(response.sum()),
        "counted_records": len(counted),
        "heldout_tokens": len(events),
        "nll": float(-np.log(mixed).mean()),
        "top1_agreement": float(top1.mean()),
        "mass_on_observed": float(on_observed.mean()),
        "coverage": float((on_observed > 0).mean()),
        "mean_order_used": float(orders.mean()),
        "seconds": time.perf_counter() - start,
    }


def prior_quality(
    counted: TokenizedCorpus, heldout: TokenizedCorpus, vocab_size: int, spec: PriorQualitySpec
) -> list[dict[str, float]]:
    """Every (amount of counted text, order) row, smallest amount first."""
    return [
        score_prior(first_tokens(counted, tokens), heldout, vocab_size, order, spec)
        for tokens in spec.counted_tokens
        for order in spec.ngram_orders
    ]


def prior_quality_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| counted teacher tokens | n | held-out NLL (nats/token) | top-1 agreement | mass on observed | coverage |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['counted_tokens']:,} | {row['ngram_order']} | {row['nll']:.3f} | {row['top1_agreement']:.3f} | "
            f"{row['mass_on_observed']:.3f} | {row['coverage']:.3f} |"
        )
    return "\n".join(lines)
