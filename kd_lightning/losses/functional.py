"""Pure tensor maths of the loss terms. Shapes: B batch, T positions, V vocabulary, K stored entries.

Every function upcasts to float32 and reduces with :func:`masked_mean`, which returns a finite 0 when
every token is masked (never 0/0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.data.batch import IGNORE_INDEX

__all__ = ["IGNORE_INDEX"]  # re-exported: losses and their users read it here


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, T) over positions where ``mask`` (B, T) is true; 0 if none are."""
    values = values.float()
    if mask is None:
        return values.mean()
    mask = mask.bool()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def token_cross_entropy(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Per-position CE (B, T) of logits (B, T, V) against ids (B, T); ``IGNORE_INDEX`` positions give 0."""
    b, t, v = student_logits.shape
    ce = F.cross_entropy(
        student_logits.float().reshape(b * t, v),
        target_ids.reshape(b * t),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return ce.view(b, t)


def hard_cross_entropy(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean CE over positions whose target is not ``IGNORE_INDEX``.

    Args:
        student_logits: (B, T, V) logits; position t predicts ``target_ids[:, t]``.
        target_ids: (B, T) long, ``IGNORE_INDEX`` where there is no target.
    """
    return masked_mean(token_cross_entropy(student_logits, target_ids), target_ids != IGNORE_INDEX)
