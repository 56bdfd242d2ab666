"""Loss terms: small ``nn.Module`` wrappers over the pure functions in :mod:`kd_lightning.losses`.

A term reads what it needs from a :class:`~kd_lightning.data.batch.PositionBatch` (the batch packed to its
target positions), returns an unweighted scalar, and carries the ``weight`` it is multiplied by in the
total. Add a term by writing one such class and one ``conf/loss/<name>.yaml``. A term may also be called
with a plain mapping in the batch's documented key form (``target_ids``, ``prior_ids`` ...); it is read
into a ``PositionBatch`` first.

Divergence terms name their ``kd_target``: the distribution they compare the student with. The batch carries
it under that name in one of these forms:

* dense logits (``batch.dense_logits[name]``, key ``<name>_logits``), e.g. the online ``teacher``;
* dense probabilities (``batch.dense_probs[name]``, key ``<name>_probs`` without ``<name>_ids``);
* sparse rows (``batch.soft_labels[name]``, keys ``<name>_ids/_probs/_tail``), e.g. the ``prior`` and
  ``posterior`` stores, an offline teacher's top-k or random-sampled logits (``kdl teacher-logits``).

Every divergence runs on either form (see :mod:`kd_lightning.losses.divergences`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kd_lightning.data.batch import PositionBatch
from kd_lightning.losses import divergences as D
from kd_lightning.losses import functional as LF


def declared_capability(cls: type, flag: str, guards: tuple[str, ...]) -> Any:
    """The value of a fast-path flag as declared for ``cls``'s code, not merely inherited past an override.

    Walks the MRO from ``cls``: the first class that sets ``flag`` decides, unless a class before it
    overrides one of ``guards`` (methods the fast path's maths assumes). A subclass that rewrites ``forward``
    therefore loses the fast path until it declares the flag again itself: fast paths are opt-in per code,
    so a user's override is always run as written.
    """
    for klass in cls.__mro__:
        if flag in vars(klass):
            return vars(klass)[flag]
        if any(name in vars(klass) for name in guards):
            return None
    return None


class LossTerm(nn.Module):
    """Base class: ``forward(student_logits, batch) -> scalar``; ``soft_labels`` names the stores it reads.

    Two class attributes opt a term into fast paths; both are read through :func:`declared_capability`, so
    a subclass that overrides ``forward`` (or ``per_position``) is run as written until it re-declares them:

    * ``chunkable``: the value is a token-weighted mean of independent per-position values, so computing it
      over chunks of rows and re-weighting is exact (``loss_chunk_size``).
    * ``fused_sparse_kind``: ``"hard_ce"`` or ``"forward_kl"`` — the term equals that closed form, so the
      one-pass sparse computation (:mod:`kd_lightning.losses.fused_sparse`) may stand in for it.
    """

    chunkable: ClassVar[bool] = False
    fused_sparse_kind: ClassVar[str | None] = None
    soft_labels: tuple[str, ...] = ()
    reads_logits: bool = True
    """False for terms that read only other batch fields (e.g. hidden states); the fused path runs them whole."""
    uses_batch_statistics: bool = False
    """True when a position's value depends on the rest of the batch (e.g. ATKD's median split), so the
    result changes with how a batch is split into micro-batches; :meth:`prepare` computes the statistic."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a loss weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Hook, called when a module is built: size parameters to the models (e.g. a projection)."""

    def prepare(self, batch: PositionBatch) -> dict[str, torch.Tensor]:
        """Hook: per-position fields computed once over the whole packed batch, before chunking.

        The fused path calls it so that a batch-level statistic is the same in every chunk; the term itself
        computes it from the batch it is given when the field is absent.
        """
        return {}

    def __call__(
        self, student_logits: torch.Tensor | None, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        return super().__call__(student_logits, PositionBatch.from_fields(batch))

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def can_chunk(self) -> bool:
        """Whether this term's code declares the chunked path exact (see the class docstring)."""
        return bool(declared_capability(type(self), "chunkable", ("forward",)))

    def fused_kind(self) -> str | None:
        """``"hard_ce"``, ``"forward_kl"`` or None: the closed form this term's code declares it equals."""
        return declared_capability(type(self), "fused_sparse_kind", ("forward", "per_position"))


def soft_label_names(terms: Iterable[LossTerm]) -> tuple[str, ...]:
    """The soft-label stores a set of terms reads (what the DataModule must be connected to)."""
    return tuple(sorted({name for term in terms for name in term.soft_labels}))


class HardCrossEntropy(LossTerm):
    """CE against the observed teacher tokens (SFT / SeqKD)."""

    chunkable = True
    fused_sparse_kind = "hard_ce"

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        return LF.hard_cross_entropy(student_logits, batch.target_ids)


def kd_target_log_probs(
    student_logits: torch.Tensor, batch: PositionBatch, kd_target: str, distill_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) buckets of the distribution named ``kd_target``, dense or sparse, as the batch carries it."""
    if kd_target in batch.dense_logits:
        return D.dense_log_probs(student_logits, batch.dense_logits[kd_target], distill_temperature)
    if kd_target in batch.dense_probs:
        return D.dense_log_probs(
            student_logits, batch.dense_probs[kd_target], distill_temperature, teacher_is_probs=True
        )
    if kd_target in batch.soft_labels:
        rows = batch.soft_labels[kd_target]
        return D.sparse_log_probs(student_logits, rows.ids, rows.probs, rows.tail, distill_temperature)
    raise KeyError(
        f"the batch has no {kd_target!r} distribution ({kd_target}_logits, {kd_target}_probs or {kd_target}_ids/_probs/_tail); connect the "
        f"DataModule to the {kd_target} soft-label store or use a module that provides {kd_target}_logits"
    )


class DivergenceTerm(LossTerm):
    """A divergence between a target distribution and the student, averaged over target positions.

    Subclasses implement :meth:`per_position` on (log p, log q) buckets.

    Args:
        kd_target: what the student is compared with: a field of the batch (``teacher``, ``prior``,
            ``posterior``, ``offline_teacher``, ``teacher_logprobs``).
        weight: multiplier of this term in the total.
        distill_temperature: divides both sides' logits; the term is scaled by T².
    """

    chunkable = True  # a masked mean of per-position values (as long as ``forward`` is this one)

    def __init__(self, kd_target: str, weight: float = 1.0, distill_temperature: float = 1.0) -> None:
        super().__init__(weight)
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.kd_target = kd_target
        self.distill_temperature = float(distill_temperature)
        # stores only: a dense teacher comes from the module (online) rather than from a soft-label store
        self.soft_labels = () if kd_target == "teacher" else (kd_target,)

    def per_position(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        log_p, log_q = kd_target_log_probs(student_logits, batch, self.kd_target, self.distill_temperature)
        values = self.per_position(log_p, log_q) * self.distill_temperature**2
        return LF.masked_mean(values, batch.target_ids != LF.IGNORE_INDEX)


class ForwardKL(DivergenceTerm):
    """KL(target ‖ student); with ``distill_temperature`` T it is Hinton's soft-target loss."""

    fused_sparse_kind = "forward_kl"

    def per_position(self, log_p, log_q):
        return D.forward_kl_buckets(log_p, log_q)


class ReverseKL(DivergenceTerm):
    """KL(student ‖ target)."""

    def per_position(self, log_p, log_q):
        return D.reverse_kl_buckets(log_p, log_q)


class GeneralizedJSD(DivergenceTerm):
    """GKD's generalised JSD; ``beta`` = 0 → KL(target‖student), 1 → KL(student‖target)."""

    def __init__(
        self, kd_target: str, beta: float = 0.5, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def per_position(self, log_p, log_q):
        return D.generalized_jsd_buckets(log_p, log_q, self.beta)


class SkewForwardKL(DivergenceTerm):
    """DistiLLM's skew KL, KL(p ‖ α·p + (1 − α)·q)."""

    def __init__(
        self, kd_target: str, alpha: float = 0.1, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature)
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
        self, kd_target: str, head_mass: float = 0.5, weight: float = 1.0, distill_temperature: float = 1.0
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature)
        if not 0.0 < head_mass < 1.0:
            raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
        self.head_mass = float(head_mass)

    def per_position(self, log_p, log_q):
        return D.adaptive_kl_buckets(log_p, log_q, self.head_mass)


def gold_bucket(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """The bucket of the observed token (``target_ids``) among the ``kd_target`` distribution's buckets
    (see ``kd_target_log_probs``).

    Dense: the token id. Sparse: the slot holding it, or the tail bucket (index K) when it was not stored.
    Positions that are not targets get bucket 0 (they are masked out anyway).
    """
    gold = batch.target_ids.clamp_min(0)
    if kd_target not in batch.soft_labels:
        return gold
    ids, probs = batch.soft_labels[kd_target].ids, batch.soft_labels[kd_target].probs
    hit = (ids == gold.unsqueeze(-1)) & (probs > 0)
    k = ids.shape[-1]
    slot = torch.where(hit, torch.arange(k, device=ids.device), torch.full_like(ids, k)).amin(-1)
    return slot


def gold_probability(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """The ``kd_target`` distribution's probability of the observed token (..., ); 0 where a sparse one did
    not store it."""
    gold = batch.target_ids.clamp_min(0).unsqueeze(-1)
    if kd_target in batch.dense_logits:
        logits = batch.dense_logits[kd_target].float()
        return (logits.gather(-1, gold).squeeze(-1) - torch.logsumexp(logits, -1)).exp().detach()
    if kd_target in batch.dense_probs:
        probs = batch.dense_probs[kd_target].float()
        return (probs.gather(-1, gold).squeeze(-1) / probs.sum(-1).clamp_min(1e-30)).detach()
    rows = batch.soft_labels[kd_target]
    return (rows.probs.float() * (rows.ids == gold)).amax(-1).detach()


class AdaptiveTeachingKD(DivergenceTerm):
    """ATKD (Zhong et al., "Revisiting Knowledge Distillation for Autoregressive Language Models", 2024).

    Positions are split by the teacher's uncertainty on the observed token, ``1 − p(gold)``: the most
    uncertain ``hard_fraction`` of the batch's target positions are "hard" (full KL, decomposed), the rest
    "easy" (diversity part only); see :func:`kd_lightning.losses.divergences.atkd_buckets`. The split is a
    batch statistic (the median by default), so the value depends on the batch a position is in.

    Args:
        target, weight, distill_temperature: as for :class:`DivergenceTerm`.
        easy_weight: λ, the weight of easy positions; hard ones get 1 − λ (paper: 0.2).
        hard_fraction: share of positions counted hard (0.5 = split at the median uncertainty).
    """

    uses_batch_statistics = True
    chunkable = True  # exact because the split comes from ``prepare`` over the whole batch

    def __init__(
        self,
        kd_target: str,
        easy_weight: float = 0.2,
        hard_fraction: float = 0.5,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature)
        if not 0.0 <= easy_weight <= 1.0:
            raise ValueError(f"easy_weight must be in [0, 1], got {easy_weight}")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
        self.easy_weight = float(easy_weight)
        self.hard_fraction = float(hard_fraction)

    @property
    def hard_key(self) -> str:
        return f"atkd_hard_{self.kd_target}"

    def hard_positions(self, batch: PositionBatch | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Bool (..., ) mask: the ``hard_fraction`` most uncertain target positions of the batch."""
        batch = PositionBatch.from_fields(batch)
        valid = batch.target_ids != LF.IGNORE_INDEX
        uncertainty = 1.0 - gold_probability(batch, self.kd_target)
        n_hard = math.ceil(self.hard_fraction * int(valid.sum()))
        hard = torch.zeros_like(valid)
        if n_hard:
            scores = torch.where(valid, uncertainty, torch.full_like(uncertainty, -1.0)).flatten()
            # a stable sort breaks ties by position, so padding or re-batching never changes the split
            order = torch.sort(scores, descending=True, stable=True).indices
            hard.view(-1)[order[:n_hard]] = True
        return hard & valid

    def prepare(self, batch: PositionBatch | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.hard_key: self.hard_positions(batch)}

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        hard = batch.prepared.get(self.hard_key)
        hard = self.hard_positions(batch) if hard is None else hard
        log_p, log_q = kd_target_log_probs(student_logits, batch, self.kd_target, self.distill_temperature)
        gold = gold_bucket(batch, self.kd_target)
        values = D.atkd_buckets(log_p, log_q, gold, hard, self.easy_weight) * self.distill_temperature**2
        return LF.masked_mean(values, batch.target_ids != LF.IGNORE_INDEX)


class SoftLabelKL(ForwardKL):
    """KL(soft labels ‖ student) against a soft-label store (``prior`` or ``posterior``).

    Args:
        soft_labels: which store the batch carries it under.
        weight: multiplier of this term in the total.
        distill_temperature: softens student and target; the term is scaled by T².
    """

    def __init__(self, soft_labels: str, weight: float = 1.0, distill_temperature: float = 1.0) -> None:
        super().__init__(kd_target=soft_labels, weight=weight, distill_temperature=distill_temperature)
