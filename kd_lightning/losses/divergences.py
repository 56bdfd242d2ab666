"""Divergences between a teacher distribution p and the student q, over one target format.

Every divergence is written once, on log-probabilities over "buckets" (last dimension):

* a **dense** target (teacher logits or probabilities over the vocabulary): the buckets are the vocabulary,
  so the result is the exact divergence;
* a **sparse** target (top-k ids, probabilities and tail mass, as in the soft-label store): the buckets are
  the k stored ids plus one tail bucket, and the student is coarsened the same way (its mass outside the
  stored ids forms its tail bucket). The result is the exact divergence between the coarsened
  distributions, a lower bound of the full one for every f-divergence; it equals the full one when the
  tail is empty.

The public functions take ``(student_logits, teacher_logits, mask=None, ...)`` with dense logits of shape
(B, T, V), upcast to float32, and return the mean over unmasked positions (a finite 0 if none).
``distill_temperature`` T divides both sides' logits and scales the result by T² (Hinton et al.), so
``forward_kl(..., distill_temperature=T)`` is the Hinton soft-target loss.
"""

from __future__ import annotations

import math

import torch

from kd_lightning.losses.functional import log1mexp, masked_mean

# Log-probabilities are floored here: exp(-1e4) is exactly 0 in float32, so a masked vocabulary entry
# (-inf logit) still has probability 0, but no -inf enters the arithmetic and every gradient stays finite.
LOG_FLOOR = -1.0e4


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-bucket ``a · (log a − log b)``, 0 where a = 0 (with finite gradients there too)."""
    a = log_a.exp()
    present = a > 0
    zero = torch.zeros_like(a)
    return a * (torch.where(present, log_a, zero) - torch.where(present, log_b, zero))


def kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension; inputs (..., N) log-probabilities; returns (...)."""
    return _xlogy_diff(log_p, log_q).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1 − w)·b) for w in [0, 1], stable."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student): mode-covering (SFT-like)."""
    return kl_buckets(log_p, log_q)


def reverse_kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(student ‖ teacher): mode-seeking (MiniLLM's objective)."""
    return kl_buckets(log_q, log_p)


def generalized_jsd_buckets(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised JSD as in GKD: ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``, ``m = β·p + (1 − β)·q``.

    The endpoints are defined as GKD defines them: β = 0 → KL(p ‖ q), β = 1 → KL(q ‖ p).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_buckets(log_p, log_q)
    if beta == 1.0:
        return kl_buckets(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * kl_buckets(log_p, log_m) + (1.0 - beta) * kl_buckets(log_q, log_m)


def skew_forward_kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew KL: ``KL(p ‖ α·p + (1 − α)·q)``; α = 0 is the forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return kl_buckets(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skew reverse KL: ``KL(q ‖ α·q + (1 − α)·p)``; α = 0 is the reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return kl_buckets(log_q, _log_mix(log_q, log_p, alpha))


def total_variation_buckets(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Total variation ``½·Σ|p − q|``."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def adaptive_kl_buckets(log_p: torch.Tensor, log_q: torch.Tensor, head_mass: float = 0.5) -> torch.Tensor:
    """AKL (Wu et al. 2024): forward and reverse KL weighted by where p and q disagree.

    Buckets are sorted by teacher probability. The "head" is the most likely buckets holding
    ``head_mass`` of the teacher's mass; the rest is the tail. With gaps ``g = Σ|p − q|`` over each part,
    the result is ``g_head/(g_head + g_tail)·FKL + g_tail/(g_head + g_tail)·RKL``: FKL fits the head, RKL
    the tail. The weights are computed from p and q like the divergences themselves (not detached).
    """
    if not 0.0 < head_mass < 1.0:
        raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
    p, q = log_p.exp(), log_q.exp()
    p_sorted, order = p.sort(dim=-1, descending=True)
    q_sorted = q.gather(-1, order)
    mass_before = p_sorted.cumsum(-1) - p_sorted
    head = mass_before < head_mass
    gap = (p_sorted - q_sorted).abs()
    g_head = (gap * head).sum(-1)
    g_tail = (gap * ~head).sum(-1)
    total = (g_head + g_tail).clamp_min(1e-12)
    return (g_head / total) * kl_buckets(log_p, log_q) + (g_tail / total) * kl_buckets(log_q, log_p)


def atkd_buckets(
    log_p: torch.Tensor, log_q: torch.Tensor, gold: torch.Tensor, hard: torch.Tensor, easy_weight: float
) -> torch.Tensor:
    """ATKD per position (Zhong et al., ACL 2024) on buckets; ``gold`` (...) is the observed token's bucket.

    The KL splits at the gold bucket g into a target-oriented part (binary KL of ``[p_g, 1 − p_g]`` against
    ``[q_g, 1 − q_g]``) and a diversity-oriented part (KL of the distributions renormalised without g).
    Hard positions (``hard`` true) get ``(1 − easy_weight)·(TKD + DKD)``; easy ones ``easy_weight·DKD``:
    on tokens the teacher is sure of, the student is not pushed further onto the gold token. The DKD
    part is taken without the ``1 − p_g`` factor the plain decomposition carries, as ATKD does, so it is
    not silenced exactly on the easy tokens. A one-hot teacher has no DKD part (0).
    """
    is_gold = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, gold.unsqueeze(-1), True)
    lp_g = log_p.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    lq_g = log_q.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    rest_p = torch.logsumexp(log_p.masked_fill(is_gold, LOG_FLOOR), dim=-1)
    rest_q = torch.logsumexp(log_q.masked_fill(is_gold, LOG_FLOOR), dim=-1)
    tkd = kl_buckets(torch.stack([lp_g, rest_p], -1), torch.stack([lq_g, rest_q], -1))
    log_p_hat = (log_p - rest_p.unsqueeze(-1)).masked_fill(is_gold, LOG_FLOOR).clamp_min(LOG_FLOOR)
    log_q_hat = (log_q - rest_q.unsqueeze(-1)).masked_fill(is_gold, LOG_FLOOR).clamp_min(LOG_FLOOR)
    dkd = torch.where(rest_p.exp() > 0, kl_buckets(log_p_hat, log_q_hat), torch.zeros_like(tkd))
    return torch.where(hard, (1.0 - easy_weight) * (tkd + dkd), easy_weight * dkd)


# ---------------------------------------------------------------------------- target → buckets


def dense_log_probs(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    distill_temperature: float = 1.0,
    teacher_is_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over the vocabulary from student logits (..., V) and teacher logits or probs (..., V)."""
    t = float(distill_temperature)
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_is_probs:
        log_p = torch.log_softmax(teacher.float().clamp_min(0).log() / t, dim=-1)
    else:
        log_p = torch.log_softmax(teacher.float() / t, dim=-1)
    return log_p.detach().clamp_min(LOG_FLOOR), log_q.clamp_min(LOG_FLOOR)


def sparse_log_probs(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_tail: torch.Tensor,
    distill_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over K stored ids + 1 tail bucket; shapes (..., V), (..., K), (..., K), (...).

    Entries with probability 0 (padding) are treated as outside the stored set. With T ≠ 1 the target is
    tempered as p^(1/T), the tail as spread evenly over the V − K ids outside.
    """
    t = float(distill_temperature)
    log_q_all = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_q_k = log_q_all.gather(-1, target_ids.long())
    p = target_probs.float().clamp_min(0.0)
    every_id = target_ids.shape[-1] >= student_logits.shape[-1]
    # with every id stored nothing lies outside: a stored tail is only rounding error
    tail = (
        torch.zeros_like(target_tail, dtype=torch.float32) if every_id else target_tail.float().clamp_min(0.0)
    )
    if t != 1.0:
        outside = student_logits.shape[-1] - target_ids.shape[-1]
        p = p.pow(1.0 / t)
        tail = outside * (tail / outside).pow(1.0 / t) if outside > 0 else torch.zeros_like(tail)
    z = (p.sum(-1) + tail).clamp_min(1e-30)
    p, tail = p / z.unsqueeze(-1), tail / z
    present = p > 0
    # rows with nothing present get a very small finite value, not -inf, so no NaN gradient appears
    log_q_k = log_q_k.masked_fill(~present, torch.finfo(torch.float32).min / 4)
    if every_id:  # the student's tail bucket is empty too, exactly
        log_q_tail = torch.full_like(log_q_k[..., 0], LOG_FLOOR)
    else:
        log_q_tail = log1mexp(torch.logsumexp(log_q_k, dim=-1))
    log_q = torch.cat([log_q_k.masked_fill(~present, LOG_FLOOR), log_q_tail.unsqueeze(-1)], dim=-1)
    log_p = torch.cat([p, tail.unsqueeze(-1)], dim=-1).log()
    return log_p.detach().clamp_min(LOG_FLOOR), log_q.clamp_min(LOG_FLOOR)


def sparse_target_kl(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_probs: torch.Tensor,
    target_tail: torch.Tensor,
    mask: torch.Tensor | None = None,
    distill_temperature: float = 1.0,
) -> torch.Tensor:
    """KL(target ‖ student) with a sparse target: top-K entries plus one tail bucket.

    The exact KL between target and student coarsened to "stored ids + everything else" (see
    :mod:`kd_lightning.losses.divergences`): a lower bound of the full-vocabulary KL that equals it when the
    tail is 0. With ``distill_temperature`` T both sides are tempered and the result is scaled by T².

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
    log_p, log_q = sparse_log_probs(
        student_logits, target_ids, target_probs, target_tail, distill_temperature
    )
    return masked_mean(forward_kl_buckets(log_p, log_q) * distill_temperature**2, mask)


def _dense(
    per_position, student_logits, teacher_logits, mask, distill_temperature: float, **settings
) -> torch.Tensor:
    """Shared body of the public functions: dense log-probs → per-position divergence → T²-scaled masked mean."""
    log_p, log_q = dense_log_probs(student_logits, teacher_logits, distill_temperature)
    return masked_mean(per_position(log_p, log_q, **settings) * float(distill_temperature) ** 2, mask)


def forward_kl(student_logits, teacher_logits, mask=None, distill_temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per position, mean over ``mask``; (B, T, V) logits each."""
    return _dense(forward_kl_buckets, student_logits, teacher_logits, mask, distill_temperature)


def reverse_kl(student_logits, teacher_logits, mask=None, distill_temperature: float = 1.0) -> torch.Tensor:
    """KL(student ‖ teacher) per position, mean over ``mask``; (B, T, V) logits each."""
    return _dense(reverse_kl_buckets, student_logits, teacher_logits, mask, distill_temperature)


def generalized_jsd(
    student_logits, teacher_logits, mask=None, beta: float = 0.5, distill_temperature: float = 1.0
) -> torch.Tensor:
    """GKD's generalised JSD (β=0: KL(teacher‖student), β=1: KL(student‖teacher)); (B, T, V) logits each."""
    return _dense(
        generalized_jsd_buckets, student_logits, teacher_logits, mask, distill_temperature, beta=beta
    )


def skew_forward_kl(
    student_logits, teacher_logits, mask=None, alpha: float = 0.1, distill_temperature: float = 1.0
) -> torch.Tensor:
    """KL(p ‖ α·p + (1 − α)·q) (DistiLLM); (B, T, V) logits each."""
    return _dense(
        skew_forward_kl_buckets, student_logits, teacher_logits, mask, distill_temperature, alpha=alpha
    )


def skew_reverse_kl(
    student_logits, teacher_logits, mask=None, alpha: float = 0.1, distill_temperature: float = 1.0
) -> torch.Tensor:
    """KL(q ‖ α·q + (1 − α)·p) (DistiLLM); (B, T, V) logits each."""
    return _dense(
        skew_reverse_kl_buckets, student_logits, teacher_logits, mask, distill_temperature, alpha=alpha
    )


def total_variation(
    student_logits, teacher_logits, mask=None, distill_temperature: float = 1.0
) -> torch.Tensor:
    """½·Σ|p − q| per position, mean over ``mask``; (B, T, V) logits each."""
    return _dense(total_variation_buckets, student_logits, teacher_logits, mask, distill_temperature)


def adaptive_kl(
    student_logits, teacher_logits, mask=None, head_mass: float = 0.5, distill_temperature: float = 1.0
) -> torch.Tensor:
    """AKL: head/tail-adaptive mix of forward and reverse KL; (B, T, V) logits each."""
    return _dense(
        adaptive_kl_buckets, student_logits, teacher_logits, mask, distill_temperature, head_mass=head_mass
    )
