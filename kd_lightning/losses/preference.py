"""Preference losses for aligning a proxy toward the teacher (Proxy-KD's second alignment step).

DPO (Rafailov et al., arXiv 2305.18290) compares how much more the policy than a frozen reference prefers the
chosen answer over the rejected one; no reward model is trained, the log-ratio is the implicit reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: ``−log σ(β · [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])``, mean over pairs.

    Args:
        policy_chosen, policy_rejected: (P,) summed log-probs of each pair's chosen / rejected answer under
            the policy being trained.
        reference_chosen, reference_rejected: (P,) the same under the frozen reference (no gradient).
        beta: > 0; how far the policy may move from the reference (smaller: further).

    Returns:
        The loss (scalar) and the reward margins (P,), ``β ·`` the bracket above, detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = beta * (
        (policy_chosen - reference_chosen.detach()) - (policy_rejected - reference_rejected.detach())
    )
    return -F.logsigmoid(margin).mean(), margin.detach()


class DPOLoss(nn.Module):
    """:func:`dpo_loss` as a module: ``forward(policy_chosen, policy_rejected, reference_chosen,
    reference_rejected) -> (loss, margins)``, all (P,) summed log-probs."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"alignment.preference.beta must be > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, policy_chosen, policy_rejected, reference_chosen, reference_rejected):
        return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta)
