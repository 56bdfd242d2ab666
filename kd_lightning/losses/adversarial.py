"""Pure tensor maths of Generative Adversarial Distillation (GAD, arXiv 2511.10643).

A discriminator D scores a (prompt, answer) pair with one number; the student (the generator) is rewarded
by D on its own sampled answers. Shapes: P prompts, G sampled answers per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss ``−log σ(D(x, y_teacher) − D(x, y_student))``, mean over the P·G pairs.

    Args:
        teacher_scores: (P,) D of each prompt's teacher answer.
        student_scores: (P, G) D of each prompt's G sampled student answers.
    """
    margins = teacher_scores.float().unsqueeze(-1) - student_scores.float()
    return F.softplus(-margins).mean()


def pair_accuracy(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """Share of the (teacher, student) pairs the discriminator orders right (ties count half)."""
    margins = teacher_scores.float().unsqueeze(-1) - student_scores.float()
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-normalised advantages (P, G): each reward minus its prompt's group mean, over the group's
    standard deviation (population). A group of one, or of equal rewards, has advantage 0."""
    rewards = rewards.float()
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def k3_kl(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(q ‖ q_ref) from sampled tokens (Schulman's k3): ``e^{r} − r − 1``,
    ``r = log q_ref − log q``; (B, T), non-negative, unbiased in expectation over q's samples."""
    ratio = (reference_logprobs.float() - logprobs.float()).clamp(-20.0, 20.0)
    return ratio.exp() - ratio - 1.0
