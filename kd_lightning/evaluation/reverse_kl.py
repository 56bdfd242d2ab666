"""Reverse KL of a student to a teacher on the student's own responses to held-out prompts.

MiniLLM's objective is ``KL(q ‖ p)`` over sequences the *student* generates. We estimate it per token:
sample a response from the student at temperature 1, then average the exact ``KL(q_t ‖ p_t)`` over the
vocabulary at every generated position — unbiased for the sequence-level KL divided by length, with far
less variance than ``log q(y) − log p(y)`` of the drawn tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.losses.policy import reverse_kl_per_position
from kd_lightning.rollout import response_logits, sample_rollouts


@torch.no_grad()
def sampled_reverse_kl(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """``reverse_kl`` (token mean of exact KL(q‖p) on student samples) and ``response_tokens`` (mean length)."""
    if not prompts:
        raise ValueError("sampled_reverse_kl needs at least one prompt")
    total, tokens, lengths = 0.0, 0.0, []
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generator = torch.Generator(device=next(student.parameters()).device).manual_seed(seed + start)
            rollout = sample_rollouts(
                student,
                chunk,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                generator=generator,
            )
            kl = reverse_kl_per_position(response_logits(student, rollout), response_logits(teacher, rollout))
            total += float((kl * rollout.response_mask).sum())
            tokens += float(rollout.response_mask.sum())
            lengths += rollout.lengths.tolist()
    finally:
        student.train(was_training)
    return {"reverse_kl": total / max(tokens, 1.0), "response_tokens": sum(lengths) / len(lengths)}
