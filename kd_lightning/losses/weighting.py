"""How a divergence term weights its target positions (``weighting``).

* ``none``: every target position counts alike.
* ``proxy_agreement`` (Proxy-KD): the aligned proxy's probability of the observed teacher token, divided by
  its mean over the batch (a batch statistic, computed once before any chunking).
* ``prior_reliability``: ``n(c) / (n(c) + m)``, with ``n(c)`` the count of the context the n-gram prior used
  at the position (after backing off) and ``m`` the term's ``reliability_pseudocount``. A context seen once
  counts for little, one seen a thousand times almost fully. The weights are not renormalised: a batch of
  thin contexts gets less distillation in all, which is the point. Read from the prior store's
  ``context_count`` channel (:data:`~kd_lightning.data.batch.STORE_CHANNELS`).
"""

from __future__ import annotations

import torch

from kd_lightning.data.batch import PositionBatch
from kd_lightning.losses import functional as LF

AGREEMENT_STORE = "proxy_agreement"
"""The store of the aligned proxy's probability of each observed teacher token (one entry per position)."""
RELIABILITY_STORE = "prior"
"""The store whose ``context_count`` channel ``weighting=prior_reliability`` reads."""
WEIGHTINGS = ("none", "proxy_agreement", "prior_reliability")
"""How a divergence term weights its positions (``weighting``)."""
STORES_READ = {"none": (), "proxy_agreement": (AGREEMENT_STORE,), "prior_reliability": (RELIABILITY_STORE,)}
"""The soft-label stores each weighting reads (the DataModule must be connected to them)."""


def gold_probability(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """The ``kd_target`` distribution's probability of the observed token (..., ); 0 where a sparse one did
    not store it."""
    gold = batch.target_ids.clamp_min(0).unsqueeze(-1)
    if kd_target in batch.dense_logits:
        logits = batch.dense_logits[kd_target].float()
        return (logits.gather(-1, gold).squeeze(-1) - torch.logsumexp(logits, -1)).exp().detach()
    if kd_target in batch.dense_probs:
        probs = batch.dense_probs[kd_target].float()
        return (probs.gather(-1, gold).squeeze(-1) / probs.sum(-1).clamp_min(1e-30)).detach()
    rows = batch.soft_labels[kd_target]
    return (rows.probs.float() * (rows.ids == gold)).amax(-1).detach()


def agreement_weights(batch: PositionBatch) -> torch.Tensor:
    """Proxy-KD's position weights (..., ): the proxy's probability of the observed teacher token, divided by
    its mean over the batch's target positions, so the weights average 1 and the term keeps its scale.

    Where the proxy gives the teacher's token little probability it imitates the teacher badly, and its soft
    labels there are trusted less. A batch where the proxy gives every observed token probability 0 (stored
    as 0 in float16) falls back to equal weights. 0 off target.
    """
    if AGREEMENT_STORE not in batch.soft_labels:
        raise KeyError(
            f"weighting=proxy_agreement reads the {AGREEMENT_STORE!r} store (the aligned proxy's probability of "
            f"each teacher token), which this batch lacks; kdl builds it from the aligned proxy when a term "
            f"sets weighting=proxy_agreement (or add {AGREEMENT_STORE}_ids/_probs/_tail to the batch)"
        )
    valid = (batch.target_ids != LF.IGNORE_INDEX).float()
    agreement = gold_probability(batch, AGREEMENT_STORE).float() * valid
    mean = agreement.sum() / valid.sum().clamp_min(1.0)
    return torch.where(mean > 0, agreement / mean.clamp_min(1e-30), valid)


def reliability_weights(batch: PositionBatch, pseudocount: float) -> torch.Tensor:
    """``n(c) / (n(c) + m)`` per position (..., ) from the prior's context counts; 0 off target."""
    rows = batch.soft_labels.get(RELIABILITY_STORE)
    if rows is None or "context_count" not in rows.channels:
        raise KeyError(
            "weighting=prior_reliability reads the prior store's context counts (its context_count channel), "
            "which this batch lacks; kdl connects the prior store when a term sets this weighting (a prior "
            "store from before kd_lightning 0.2 has no counts: it is rebuilt, as its key differs)"
        )
    counts = rows.channels["context_count"].float().clamp_min(0.0)
    valid = (batch.target_ids != LF.IGNORE_INDEX).float()
    return counts / (counts + float(pseudocount)).clamp_min(1e-30) * valid
