"""Decoupled divergences (Decoupled KD, Zhao et al., CVPR 2022), for estimated targets.

A divergence splits at the observed token: how sure the target is of it (a binary distribution) and how it
ranks the other tokens (the rest, renormalised). Weighting the two parts apart lets a hard CE alone set the
student's confidence in the observed token while an estimate (the n-gram prior, the proxy's posterior)
only ranks the alternatives: at ``target_weight`` = 0 the estimate never caps the observed token's
probability, which is what hurts a fluent student under the coupled KL.
"""

from __future__ import annotations

import torch

from kd_lightning.losses.divergences import LOG_FLOOR, dense_log_probs, kl_buckets
from kd_lightning.losses.functional import log1mexp, masked_mean


def decoupled_parts(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    gold: torch.Tensor,
    per_position=None,
    log_q_hat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target and non-target parts of a divergence split at the observed token's bucket ``gold``.

    ``b = [p_g, 1 − p_g]`` is the binary distribution "the observed token or not"; ``p̂`` is p over the other
    buckets, renormalised. Returns ``(D(b_p ‖ b_q), D(p̂ ‖ q̂), p_g)`` per position, with D the forward KL
    unless ``per_position`` names another divergence over buckets. For the KL,
    ``KL(p ‖ q) = KL(b_p ‖ b_q) + (1 − p_g)·KL(p̂ ‖ q̂)``. Where the target puts all its mass on the observed
    token, ``p̂`` is undefined and the non-target part is 0. Shapes: (..., N) buckets, (...) long ``gold``.

    ``log_q_hat`` (..., N): the student's ``q̂`` when the caller computed it from logits with the observed
    one masked out, which makes the non-target part's gradient on that logit exactly 0 (from ``log_q`` it
    is 0 only up to rounding, through the normaliser).
    """
    divergence = kl_buckets if per_position is None else per_position
    is_gold = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, gold.unsqueeze(-1), True)
    lp_g = log_p.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    lq_g = log_q.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    rest_p = torch.logsumexp(log_p.masked_fill(is_gold, LOG_FLOOR), dim=-1)
    rest_q = torch.logsumexp(log_q.masked_fill(is_gold, LOG_FLOOR), dim=-1)
    target = divergence(torch.stack([lp_g, rest_p], -1).clamp_min(LOG_FLOOR), torch.stack([lq_g, rest_q], -1))
    log_p_hat = (log_p - rest_p.unsqueeze(-1)).masked_fill(is_gold, LOG_FLOOR).clamp_min(LOG_FLOOR)
    if log_q_hat is None:
        log_q_hat = log_q - rest_q.unsqueeze(-1)
    log_q_hat = log_q_hat.masked_fill(is_gold, LOG_FLOOR).clamp_min(LOG_FLOOR)
    has_rest = rest_p > LOG_FLOOR / 2
    nontarget = torch.where(has_rest, divergence(log_p_hat, log_q_hat), torch.zeros_like(target))
    return target, nontarget, lp_g.exp()


def decoupled_buckets(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    gold: torch.Tensor,
    target_weight: float,
    nontarget_weight: float,
    per_position=None,
    log_q_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022) per position: ``α·D(b_p ‖ b_q) + β·D(p̂ ‖ q̂)``.

    With α = ``target_weight`` = 0 the observed token's logit gets no gradient: q̂ does not depend on it, so
    a hard CE term alone sets how sure the student is of the observed token, and the target distribution
    only ranks the alternatives (an estimated target never caps the observed token's probability). See
    :func:`decoupled_parts` for the parts (and ``log_q_hat``); shapes (..., N) buckets, (...) ``gold``;
    returns (...).
    """
    target, nontarget, _ = decoupled_parts(log_p, log_q, gold, per_position, log_q_hat)
    if target_weight == 0.0:  # not even a 0 · NaN may reach the observed logit
        return nontarget_weight * nontarget
    return target_weight * target + nontarget_weight * nontarget


def nontarget_log_probs(
    student_logits: torch.Tensor, observed: torch.Tensor, distill_temperature: float = 1.0
):
    """log q̂ (..., V): the student over the vocabulary without the observed token, renormalised, computed
    from the logits with the observed one masked out (so nothing depends on it); ``observed`` (...) long."""
    logits = student_logits.float() / float(distill_temperature)
    masked = logits.scatter(-1, observed.unsqueeze(-1), float("-inf"))
    return torch.log_softmax(masked, dim=-1).clamp_min(LOG_FLOOR)


def decoupled_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    observed: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_weight: float = 1.0,
    nontarget_weight: float = 1.0,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled KL: ``α·KL(b_t ‖ b_s) + β·KL(p̂_t ‖ p̂_s)``, mean over ``mask``.

    ``b = [p(observed), 1 − p(observed)]`` and ``p̂`` is the distribution over the other tokens,
    renormalised (teacher t, student s). α = β = 1 is not the KL: the KL weights the second part by
    ``1 − p_t(observed)`` (:func:`decoupled_parts`); decoupling sets the two weights apart.

    Args:
        student_logits, teacher_logits: (B, T, V).
        observed: (B, T) long, the observed next token (negative: not a target position).
        mask: (B, T) bool, positions that count (default: ``observed >= 0``).
        target_weight: α; 0 leaves the observed token's probability to the other terms.
        nontarget_weight: β.
        distill_temperature: T divides both sides' logits; the result is scaled by T².
    """
    log_p, log_q = dense_log_probs(student_logits, teacher_logits, distill_temperature)
    gold = observed.clamp_min(0)
    log_q_hat = nontarget_log_probs(student_logits, gold, distill_temperature)
    values = decoupled_buckets(log_p, log_q, gold, target_weight, nontarget_weight, log_q_hat=log_q_hat)
    mask = observed >= 0 if mask is None else mask
    return masked_mean(values * float(distill_temperature) ** 2, mask)


def sparse_log_probs_with_gold(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_tail: torch.Tensor,
    observed: torch.Tensor,
    distill_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`sparse_log_probs`, with the observed token in a bucket of its own (the last), for the
    decoupled terms: (log p, log q) over K stored ids + tail + observed, the observed bucket's index, and
    log q̂ over the same buckets from the logits without the observed one (:func:`nontarget_log_probs`).

    A row that stores the observed id moves it to the last bucket; one that does not gives it target
    probability 0 there (its mass, if any, stays in the tail) and the student's probability of it, carved
    out of the student's tail bucket. The buckets are then "the stored others, the rest, the observed".
    """
    t = float(distill_temperature)
    log_q_all = torch.log_softmax(student_logits.float() / t, dim=-1)
    ids = target_ids.long()
    gold = observed.clamp_min(0).long()
    p = target_probs.float().clamp_min(0.0)
    match = (ids == gold.unsqueeze(-1)) & (p > 0)
    first = match & (match.cumsum(-1) == 1)
    every_id = ids.shape[-1] >= student_logits.shape[-1]
    tail = (
        torch.zeros_like(target_tail, dtype=torch.float32) if every_id else target_tail.float().clamp_min(0.0)
    )
    if t != 1.0:
        outside = student_logits.shape[-1] - ids.shape[-1]
        p = p.pow(1.0 / t)
        tail = outside * (tail / outside).pow(1.0 / t) if outside > 0 else torch.zeros_like(tail)
    z = (p.sum(-1) + tail).clamp_min(1e-30)
    p, tail = p / z.unsqueeze(-1), tail / z
    p_gold = (p * first).sum(-1)
    others = (p > 0) & ~first
    p_others = p * others
    log_q_k = log_q_all.gather(-1, ids).masked_fill(~others, torch.finfo(torch.float32).min / 4)
    log_q_gold = log_q_all.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    inside = torch.logsumexp(torch.cat([log_q_k, log_q_gold.unsqueeze(-1)], -1), dim=-1)
    log_q_tail = torch.full_like(log_q_gold, LOG_FLOOR) if every_id else log1mexp(inside)
    log_q = torch.cat(
        [log_q_k.masked_fill(~others, LOG_FLOOR), log_q_tail.unsqueeze(-1), log_q_gold.unsqueeze(-1)], -1
    )
    log_p = torch.cat([p_others, tail.unsqueeze(-1), p_gold.unsqueeze(-1)], -1).log()
    index = torch.full_like(gold, ids.shape[-1] + 1)
    hat_all = nontarget_log_probs(student_logits, gold, t)
    hat_k = hat_all.gather(-1, ids).masked_fill(~others, torch.finfo(torch.float32).min / 4)
    hat_tail = (
        torch.full_like(log_q_gold, LOG_FLOOR) if every_id else log1mexp(torch.logsumexp(hat_k, dim=-1))
    )
    log_q_hat = torch.cat(
        [
            hat_k.masked_fill(~others, LOG_FLOOR),
            hat_tail.unsqueeze(-1),
            torch.full_like(hat_tail, LOG_FLOOR)[..., None],
        ],
        -1,
    )
    return (
        log_p.detach().clamp_min(LOG_FLOOR),
        log_q.clamp_min(LOG_FLOOR),
        index,
        log_q_hat.clamp_min(LOG_FLOOR),
    )
