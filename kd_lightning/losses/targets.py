"""A divergence term's target as buckets: the (log p, log q) pair a divergence is computed over, from the
distribution the batch carries under a ``kd_target`` name (dense logits, dense probabilities or sparse rows;
see :mod:`kd_lightning.losses.divergences`)."""

from __future__ import annotations

import torch

from kd_lightning.data.batch import PositionBatch
from kd_lightning.losses import divergences as D
from kd_lightning.losses.decoupled import nontarget_log_probs, sparse_log_probs_with_gold


def kd_target_log_probs(
    student_logits: torch.Tensor, batch: PositionBatch, kd_target: str, distill_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) buckets of the distribution named ``kd_target``, dense or sparse, as the batch carries it."""
    if kd_target in batch.dense_logits:
        return D.dense_log_probs(student_logits, batch.dense_logits[kd_target], distill_temperature)
    if kd_target in batch.dense_probs:
        return D.dense_log_probs(
            student_logits, batch.dense_probs[kd_target], distill_temperature, teacher_is_probs=True
        )
    if kd_target in batch.soft_labels:
        rows = batch.soft_labels[kd_target]
        return D.sparse_log_probs(student_logits, rows.ids, rows.probs, rows.tail, distill_temperature)
    raise KeyError(
        f"the batch has no {kd_target!r} distribution ({kd_target}_logits, {kd_target}_probs or {kd_target}_ids/_probs/_tail); connect the "
        f"DataModule to the {kd_target} soft-label store or use a module that provides {kd_target}_logits"
    )


def decoupled_log_probs(
    student_logits: torch.Tensor, batch: PositionBatch, kd_target: str, distill_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p, log q) buckets of ``kd_target``, the observed token's bucket (..., ) and the student's log q̂
    without it, for decoupled terms: over the vocabulary when dense, over the stored others + tail +
    observed when sparse."""
    if kd_target in batch.soft_labels:
        rows = batch.soft_labels[kd_target]
        return sparse_log_probs_with_gold(
            student_logits, rows.ids, rows.probs, rows.tail, batch.target_ids, distill_temperature
        )
    log_p, log_q = kd_target_log_probs(student_logits, batch, kd_target, distill_temperature)
    gold = batch.target_ids.clamp_min(0)
    return log_p, log_q, gold, nontarget_log_probs(student_logits, gold, distill_temperature)
