"""Pure tensor maths of the loss terms. Shapes: B batch, T positions, V vocabulary, K stored entries.

Every function upcasts to float32 and reduces with :func:`masked_mean`, which returns a finite 0 when
every token is masked (never 0/0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, T) over positions where ``mask`` (B, T) is true; 0 if none are."""
    values = values.float()
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


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


def sparse_target_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_tail: torch.Tensor,
    mask: torch.Tensor | None = None,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
    """KL(target ‖ student) with a sparse target: top-K entries plus one tail bucket.

    The target puts ``target_probs`` on ``target_ids`` and ``target_tail`` on "every other id"; the
    student's distribution is coarsened the same way (its mass outside the stored ids forms its tail
    bucket), so the result is the exact KL between the two coarsened distributions — a lower bound of the
    full-vocabulary KL that equals it when the tail is 0. Entries with probability 0 (padding) count as
    outside. With ``distill_temperature`` T, the student's logits are divided by T, the target is
    tempered as p^(1/T) (renormalised; the tail as spread evenly over the ids outside), and the KL is scaled by T²
    (Hinton et al.) so gradients keep their size.

    Args:
        student_logits: (B, T, V).
        target_ids: (B, T, K) long.
        target_probs: (B, T, K) probabilities.
        target_tail: (B, T) mass outside ``target_ids``.
        mask: (B, T) bool, positions that count.
        distill_temperature: T > 0.

    Returns:
        Scalar mean over masked positions (0 if none).
    """
    if distill_temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
    log_q = torch.log_softmax(student_logits.float() / distill_temperature, dim=-1)
    log_q_k = log_q.gather(-1, target_ids.long())
    p = target_probs.float().clamp_min(0.0)
    tail = target_tail.float().clamp_min(0.0)
    if distill_temperature != 1.0:
        # the tail is modelled as spread evenly over the V - K ids outside the stored ones (as in
        # SparseRows.to_dense), so it is tempered id by id, not as one lump
        outside = student_logits.shape[-1] - target_ids.shape[-1]
        p = p.pow(1.0 / distill_temperature)
        tail = (
            outside * (tail / outside).pow(1.0 / distill_temperature)
            if outside > 0
            else torch.zeros_like(tail)
        )
        z = (p.sum(-1) + tail).clamp_min(1e-30)  # rows without a target (padding) stay 0, not 0/0
        p, tail = p / z.unsqueeze(-1), tail / z
    present = p > 0
    # rows with nothing present get a very small finite value, not -inf, so no NaN gradient appears
    log_q_covered = torch.logsumexp(log_q_k.masked_fill(~present, torch.finfo(torch.float32).min / 4), dim=-1)
    log_q_tail = log1mexp(log_q_covered)
    kl_k = torch.where(present, p * (torch.log(p.clamp_min(1e-30)) - log_q_k), torch.zeros_like(p)).sum(-1)
    kl_tail = torch.where(
        tail > 0, tail * (torch.log(tail.clamp_min(1e-30)) - log_q_tail), torch.zeros_like(tail)
    )
    per_position = (kl_k + kl_tail) * distill_temperature**2
    return masked_mean(per_position, mask)
