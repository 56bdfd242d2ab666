"""Divergences between distributions over *different* vocabularies (cross-tokenizer distillation).

ULD (Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
LLMs", arXiv 2402.12030): with no map between the two vocabularies, compare the distributions' *shapes*.
Sort both probability vectors in decreasing order, zero-pad the shorter, and sum the absolute differences;
the paper uses this as its closed form of the Wasserstein-1 distance between the two distributions with a
uniform cost between any two tokens of different rank. It is zero for a teacher whose distribution is a
permutation of the student's (it cannot tell which token is which), so it is paired with the hard CE on
the student's own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.losses.functional import masked_mean


def uld_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``Σ_i |sort(p_student)_i − sort(p_teacher)_i|`` per position: logits (..., V_s), (..., V_t) → (...).

    Both sides are softmaxed in float32 and sorted in decreasing order; the shorter vector is zero-padded.
    The teacher side carries no gradient.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must agree on every dimension but the vocabulary"
        )
    p_s = torch.softmax(student_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    with torch.no_grad():
        p_t = torch.softmax(teacher_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def uld(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ULD averaged over the positions where ``mask`` (...,) is true (all when None); 0 if none are.

    Args:
        student_logits: (..., V_s) at the aligned positions.
        teacher_logits: (..., V_t), the teacher's at the same positions (V_t may differ from V_s).
        mask: (...,) bool, the positions to average over.
    """
    return masked_mean(uld_per_position(student_logits, teacher_logits), mask)
