"""Loss terms: small ``nn.Module`` wrappers over :mod:`kd_lightning.losses.functional`.

A term reads what it needs from the batch, returns an unweighted scalar, and carries the ``weight`` it
is multiplied by in the total. Add a term by writing one such class and one ``conf/loss/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kd_lightning.losses import functional as LF


class LossTerm(nn.Module):
    """Base class: ``forward(student_logits, batch) -> scalar``; ``soft_labels`` names the stores it reads."""

    soft_labels: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a loss weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(
        self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def soft_label_names(terms: Iterable[LossTerm]) -> tuple[str, ...]:
    """The soft-label stores a set of terms reads (what the DataModule must be connected to)."""
    return tuple(sorted({name for term in terms for name in term.soft_labels}))


class HardCrossEntropy(LossTerm):
    """CE against the observed teacher tokens (SFT / SeqKD)."""

    def forward(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return LF.hard_cross_entropy(student_logits, batch["target_ids"])


class SoftLabelKL(LossTerm):
    """KL(soft labels ‖ student) against a sparse soft-label store (the prior or the posterior).

    Args:
        soft_labels: which store the batch carries it under (``prior`` or ``posterior``).
        weight: multiplier of this term in the total.
        distill_temperature: softens student and target; the term is scaled by T².
    """

    def __init__(self, soft_labels: str, weight: float = 1.0, distill_temperature: float = 1.0) -> None:
        super().__init__(weight)
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.name = soft_labels
        self.soft_labels = (soft_labels,)
        self.distill_temperature = float(distill_temperature)

    def forward(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        key = self.name
        if f"{key}_ids" not in batch:
            raise KeyError(
                f"the batch has no {key!r} soft labels; the DataModule must be connected to the {key} store"
            )
        return LF.sparse_target_kl(
            student_logits,
            batch[f"{key}_ids"],
            batch[f"{key}_probs"],
            batch[f"{key}_tail"],
            mask=batch["target_ids"] != LF.IGNORE_INDEX,
            distill_temperature=self.distill_temperature,
        )
