"""Loss terms: small ``nn.Module`` wrappers over the pure functions in :mod:`kd_lightning.losses`.

A term reads what it needs from the batch, returns an unweighted scalar, and carries the ``weight`` it is
multiplied by in the total. Add a term by writing one such class and one ``conf/loss/<name>.yaml``.

Divergence terms name their ``target``. The batch carries a target under that name in one of two forms:

* dense: ``<target>_logits`` (..., V), e.g. ``teacher_logits`` from an online teacher;
* sparse: ``<target>_ids``, ``<target>_probs``, ``<target>_tail``, e.g. the ``prior`` and ``posterior`` stores.

Every divergence runs on either form (see :mod:`kd_lightning.losses.divergences`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from kd_lightning.losses import divergences as D
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


def target_log_probs(
    student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor], target: str, distill_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) buckets for the named target, dense or sparse, whichever the batch carries."""
    if f"{target}_logits" in batch:
        return D.dense_log_probs(student_logits, batch[f"{target}_logits"], distill_temperature)
    if f"{target}_ids" in batch:
        return D.sparse_log_probs(
            student_logits,
            batch[f"{target}_ids"],
            batch[f"{target}_probs"],
            batch[f"{target}_tail"],
            distill_temperature,
        )
    raise KeyError(
        f"the batch has no {target!r} target ({target}_logits or {target}_ids/_probs/_tail); connect the "
        f"DataModule to the {target} soft-label store or use a module that provides {target}_logits"
    )


class DivergenceTerm(LossTerm):
    """A divergence between a target distribution and the student, averaged over target positions.

    Subclasses implement :meth:`per_position` on (log p, log q) buckets.

    Args:
        target: name of the target in the batch (``teacher``, ``prior``, ``posterior``, ...).
        weight: multiplier of this term in the total.
        distill_temperature: divides both sides' logits; the term is scaled by T².
    """

    def __init__(self, target: str, weight: float = 1.0, distill_temperature: float = 1.0) -> None:
        super().__init__(weight)
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.target = target
        self.distill_temperature = float(distill_temperature)
        # stores only: a dense teacher comes from the module (online) rather than from a soft-label store
        self.soft_labels = () if target == "teacher" else (target,)

    def per_position(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        log_p, log_q = target_log_probs(student_logits, batch, self.target, self.distill_temperature)
        values = self.per_position(log_p, log_q) * self.distill_temperature**2
        return LF.masked_mean(values, batch["target_ids"] != LF.IGNORE_INDEX)


class ForwardKL(DivergenceTerm):
    """KL(target ‖ student); with ``distill_temperature`` T it is Hinton's soft-target loss."""

    def per_position(self, log_p, log_q):
        return D.forward_kl_buckets(log_p, log_q)


class ReverseKL(DivergenceTerm):
    """KL(student ‖ target)."""

    def per_position(self, log_p, log_q):
        return D.reverse_kl_buckets(log_p, log_q)


class GeneralizedJSD(DivergenceTerm):
    """GKD's generalised JSD; ``beta`` = 0 → KL(target‖student), 1 → KL(student‖target)."""

    def __init__(
        self, target: str, beta: float = 0.5, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(target, weight, distill_temperature)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def per_position(self, log_p, log_q):
        return D.generalized_jsd_buckets(log_p, log_q, self.beta)


class SkewForwardKL(DivergenceTerm):
    """DistiLLM's skew KL, KL(p ‖ α·p + (1 − α)·q)."""

    def __init__(
        self, target: str, alpha: float = 0.1, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(target, weight, distill_temperature)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)

    def per_position(self, log_p, log_q):
        return D.skew_forward_kl_buckets(log_p, log_q, self.alpha)


class SkewReverseKL(SkewForwardKL):
    """DistiLLM's skew reverse KL, KL(q ‖ α·q + (1 − α)·p)."""

    def per_position(self, log_p, log_q):
        return D.skew_reverse_kl_buckets(log_p, log_q, self.alpha)


class TotalVariation(DivergenceTerm):
    """½·Σ|p − q|."""

    def per_position(self, log_p, log_q):
        return D.total_variation_buckets(log_p, log_q)


class AdaptiveKL(DivergenceTerm):
    """AKL: forward KL on the teacher's head, reverse KL on its tail, weighted by the gaps."""

    def __init__(
        self, target: str, head_mass: float = 0.5, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(target, weight, distill_temperature)
        if not 0.0 < head_mass < 1.0:
            raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
        self.head_mass = float(head_mass)

    def per_position(self, log_p, log_q):
        return D.adaptive_kl_buckets(log_p, log_q, self.head_mass)


class SoftLabelKL(ForwardKL):
    """KL(soft labels ‖ student) against a soft-label store (``prior`` or ``posterior``).

    Args:
        soft_labels: which store the batch carries it under.
        weight: multiplier of this term in the total.
        distill_temperature: softens student and target; the term is scaled by T².
    """

    def __init__(self, soft_labels: str, weight: float = 1.0, distill_temperature: float = 1.0) -> None:
        super().__init__(target=soft_labels, weight=weight, distill_temperature=distill_temperature)
