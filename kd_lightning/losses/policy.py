"""Pure tensor maths of reverse-KL policy-gradient distillation (MiniLLM, arXiv 2306.08543).

Shapes: B rollouts, T response positions, V vocabulary. ``mask`` (B, T) marks generated tokens, the
end-of-sequence token included; everything after it is padding. p is the teacher, q the student, p̃ the
distribution the rollout tokens were drawn from (teacher-mixed: ``α·p + (1 − α)·q``).

MiniLLM minimises KL(q ‖ p) over the student's own sequences. Its gradient splits (paper, Eq. 4–5) into

* a **single-step** part: at each position the exact expectation over the vocabulary of
  ``r_t = log p(y_t) − log q(y_t)`` is ``−KL(q_t ‖ p_t)``, so its gradient needs no sampling
  (:func:`single_step_reverse_kl`);
* a **long-term** part: ``R_{t+1}``, the (discounted, length-normalised) sum of the future rewards
  (:func:`future_returns`), multiplies ``∇ log q(y_t)``; it is optimised with PPO's clipped surrogate
  (:func:`ppo_clipped_surrogate`).

Sampling from p̃ instead of q is corrected per token by ``w_t = q(y_t) / p̃(y_t)`` (:func:`importance_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kd_lightning.losses.functional import masked_mean

LOG_FLOOR = -1.0e4
"""Log-probabilities are clamped here so ``−inf`` (masked vocabulary, padding logits) never makes 0·∞ = NaN."""


def finite_log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` in fp32 with −inf entries clamped to :data:`LOG_FLOOR`."""
    return torch.log_softmax(logits.float() / float(temperature), dim=-1).clamp_min(LOG_FLOOR)


def teacher_mixed_log_probs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_mix_alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p̃ (..., V) of ``α·softmax(teacher/τ) + (1 − α)·softmax(student/τ)``, computed in log space.

    Args:
        student_logits, teacher_logits: (..., V) logits of the same positions.
        teacher_mix_alpha: α ∈ [0, 1]; 0 samples from the student alone, 1 from the teacher alone.
        temperature: the generation temperature τ applied to both before mixing.
    """
    if not 0.0 <= teacher_mix_alpha <= 1.0:
        raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {teacher_mix_alpha}")
    log_q = finite_log_softmax(student_logits, temperature)
    if teacher_mix_alpha == 0.0:
        return log_q
    log_p = finite_log_softmax(teacher_logits, temperature)
    if teacher_mix_alpha == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(teacher_mix_alpha), log_q + math.log1p(-teacher_mix_alpha))


def importance_weights(
    student_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    max_weight: float | None = None,
) -> torch.Tensor:
    """Per-token ``w_t = q(y_t) / p̃(y_t)`` (B, T), 0 on padding, optionally capped at ``max_weight``.

    The paper approximates the sequence-level ratio by this per-token one to keep its variance down.
    """
    log_w = (student_logprobs.float() - sampling_logprobs.float()).clamp(max=50.0)
    weights = torch.where(mask.bool(), log_w.exp(), torch.zeros_like(log_w))
    return weights.clamp(max=max_weight) if max_weight is not None else weights


def token_rewards(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_scale: float = 1.0,
    reward_clip: float | None = None,
) -> torch.Tensor:
    """``r_t = log p(y_t) − log q(y_t)`` (B, T), divided by ``reward_scale``, clipped to ±``reward_clip``; 0 on padding."""
    if reward_scale <= 0:
        raise ValueError(f"reward_scale must be > 0, got {reward_scale}")
    if reward_clip is not None and reward_clip <= 0:
        raise ValueError(f"reward_clip must be > 0 (or None for no clipping), got {reward_clip}")
    rewards = (
        teacher_logprobs.float().clamp_min(LOG_FLOOR) - student_logprobs.float().clamp_min(LOG_FLOOR)
    ) / reward_scale
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards))


def future_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    discount: float = 1.0,
    length_normalize: bool = True,
    include_current: bool = False,
) -> torch.Tensor:
    """``R_{t+1}`` (B, T): the discounted sum of the rewards *after* position t, 0 at the last token.

    With ``length_normalize`` (MiniLLM's ``R^Norm``) the sum is divided by the number of tokens it adds
    up, so long responses are not favoured just for collecting more reward terms.

    Args:
        rewards: (B, T) per-token rewards, 0 on padding.
        mask: (B, T) generated tokens (a prefix of each row).
        discount: γ ∈ (0, 1]; ``Σ_{t' > t} γ^{t'−t−1} r_{t'}``.
        length_normalize: divide by the count of summed tokens (≥ 1).
        include_current: sum from t itself, ``Σ_{t' ≥ t} γ^{t'−t} r_{t'}`` (the reference code's return;
            in the paper the single-step term covers ``r_t``).
    """
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    after = torch.zeros_like(rewards[:, 0])  # Σ_{t' > t} γ^{t'-t-1} r_{t'}
    for t in range(rewards.shape[1] - 1, -1, -1):
        current = rewards[:, t] * mask[:, t] + discount * after
        returns[:, t] = current if include_current else after
        after = current
    if length_normalize:
        summed = mask.flip(1).cumsum(1).flip(1)  # tokens from t on
        if not include_current:
            summed = summed - mask
        returns = returns / summed.clamp_min(1.0)
    return returns * mask


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero-mean, unit-variance over the masked entries (the reference code whitens advantages).

    ``total`` sums a statistic over the ranks of a distributed run (None: this process's entries are all), so
    that every rank whitens by the global batch's mean and variance, as one process would."""
    total = total if total is not None else (lambda t: t)
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    count = total(mask.sum().to(values.dtype)).clamp_min(1)
    mean = total(torch.where(mask, values, zeros).sum()) / count
    var = total(torch.where(mask, (values - mean) ** 2, zeros).sum()) / count
    return torch.where(mask, (values - mean) * torch.rsqrt(var + 1e-8), torch.zeros_like(values))


def ppo_clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    ppo_clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped policy-gradient loss ``−E[w_t · min(ρ_t A_t, clip(ρ_t, 1±ε) A_t)]`` and the clipped share.

    ``ρ_t = q_θ(y_t) / q_old(y_t)`` is the change since the rollout; ``w_t = q_old / p̃`` corrects for the
    teacher-mixed sampling and is kept outside the clip (the reference code clips the product ``ρ·w``).

    Args:
        logprobs: (B, T) log q_θ(y_t) of the current student (carries the gradient).
        old_logprobs, advantages, weights: (B, T), detached.
        mask: (B, T) generated tokens.
        ppo_clip: ε.
    Returns:
        (loss, fraction of tokens whose ratio was clipped).
    """
    if ppo_clip <= 0:
        raise ValueError(f"ppo_clip must be > 0, got {ppo_clip}")
    log_ratio = torch.where(
        mask.bool(), logprobs.float() - old_logprobs.float(), torch.zeros_like(logprobs.float())
    )
    ratio = log_ratio.clamp(max=20.0).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - ppo_clip, 1.0 + ppo_clip) * advantages
    loss = -masked_mean(weights * torch.minimum(unclipped, clipped), mask)
    clip_share = masked_mean(((ratio - 1.0).abs() > ppo_clip).float(), mask)
    return loss, clip_share.detach()


def reverse_kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(q_t ‖ p_t) = Σ_v q log(q/p)`` (B, T) over the vocabulary; finite with −inf logits."""
    log_q = finite_log_softmax(student_logits)
    log_p = finite_log_softmax(teacher_logits).detach()
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def single_step_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLLM's single-step term: the mean over tokens of ``w_t · KL(q_t ‖ p_t)``, summed exactly over V.

    Its gradient is ``−Σ_t w_t ∇ E_{y_t∼q_t}[r_t]``: minimising it is gradient ascent on the expected
    immediate reward, with no sampling noise. The teacher side carries no gradient.

    Args:
        student_logits, teacher_logits: (B, T, V) at the response positions.
        mask: (B, T) generated tokens.
        weights: (B, T) detached importance weights, or None for 1 (the reference code's choice).
    """
    values = reverse_kl_per_position(student_logits, teacher_logits)
    if weights is not None:
        values = values * weights.detach()
    return masked_mean(values, mask)


def gather_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits/τ)[token] (B, T) for logits (B, T, V) and ids (B, T)."""
    return finite_log_softmax(logits, temperature).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
