"""ATKD (Zhong et al., 2024): a divergence that treats the teacher's easy and hard positions differently."""

from __future__ import annotations

import math

import torch

from kd_lightning.data.batch import PositionBatch
from kd_lightning.losses import divergences as D
from kd_lightning.losses import functional as LF
from kd_lightning.losses.targets import kd_target_log_probs
from kd_lightning.losses.terms import DivergenceTerm
from kd_lightning.losses.weighting import gold_probability


def gold_bucket(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """The bucket of the observed token (``target_ids``) among the ``kd_target`` distribution's buckets
    (see ``kd_target_log_probs``).

    Dense: the token id. Sparse: the slot holding it, or the tail bucket (index K) when it was not stored.
    Positions that are not targets get bucket 0 (they are masked out anyway).
    """
    gold = batch.target_ids.clamp_min(0)
    if kd_target not in batch.soft_labels:
        return gold
    ids, probs = batch.soft_labels[kd_target].ids, batch.soft_labels[kd_target].probs
    hit = (ids == gold.unsqueeze(-1)) & (probs > 0)
    k = ids.shape[-1]
    slot = torch.where(hit, torch.arange(k, device=ids.device), torch.full_like(ids, k)).amin(-1)
    return slot


class AdaptiveTeachingKD(DivergenceTerm):
    """ATKD (Zhong et al., "Revisiting Knowledge Distillation for Autoregressive Language Models", 2024).

    Positions are split by the teacher's uncertainty on the observed token, ``1 − p(gold)``: the most
    uncertain ``hard_fraction`` of the batch's target positions are "hard" (full KL, decomposed), the rest
    "easy" (diversity part only); see :func:`kd_lightning.losses.divergences.atkd_buckets`. The split is a
    batch statistic (the median by default), so the value depends on the batch a position is in.

    Args:
        target, weight, distill_temperature, weighting, reliability_pseudocount: as for
            :class:`DivergenceTerm` (ATKD splits at the observed token in its own way: no ``decoupled``).
        easy_weight: λ, the weight of easy positions; hard ones get 1 − λ (paper: 0.2).
        hard_fraction: share of positions counted hard (0.5 = split at the median uncertainty).
    """

    uses_batch_statistics = True
    chunkable = True  # exact because the split comes from ``prepare`` over the whole batch

    def __init__(
        self,
        kd_target: str,
        easy_weight: float = 0.2,
        hard_fraction: float = 0.5,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
        reliability_pseudocount: float = 10.0,
    ) -> None:
        super().__init__(
            kd_target, weight, distill_temperature, weighting, reliability_pseudocount=reliability_pseudocount
        )
        if not 0.0 <= easy_weight <= 1.0:
            raise ValueError(f"easy_weight must be in [0, 1], got {easy_weight}")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        self.easy_weight = float(easy_weight)
        self.hard_fraction = float(hard_fraction)

    @property
    def hard_key(self) -> str:
        return f"atkd_hard_{self.kd_target}"

    def hard_positions(self, batch: PositionBatch) -> torch.Tensor:
        """Bool (..., ) mask: the ``hard_fraction`` most uncertain target positions of the batch."""
        valid = batch.target_ids != LF.IGNORE_INDEX
        uncertainty = 1.0 - gold_probability(batch, self.kd_target)
        n_hard = math.ceil(self.hard_fraction * int(valid.sum()))
        hard = torch.zeros_like(valid)
        if n_hard:
            scores = torch.where(valid, uncertainty, torch.full_like(uncertainty, -1.0)).flatten()
            # a stable sort breaks ties by position, so padding or re-batching never changes the split
            order = torch.sort(scores, descending=True, stable=True).indices
            hard.view(-1)[order[:n_hard]] = True
        return hard & valid

    def prepare(self, batch: PositionBatch) -> dict[str, torch.Tensor]:
        return {**super().prepare(batch), self.hard_key: self.hard_positions(batch)}

    weights_positions = True  # its forward applies position_weights

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        hard = batch.prepared.get(self.hard_key)
        hard = self.hard_positions(batch) if hard is None else hard
        log_p, log_q = kd_target_log_probs(student_logits, batch, self.kd_target, self.distill_temperature)
        gold = gold_bucket(batch, self.kd_target)
        values = D.atkd_buckets(log_p, log_q, gold, hard, self.easy_weight) * self.distill_temperature**2
        return self.weighted(values, batch)
