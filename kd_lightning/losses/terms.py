"""Loss terms: small ``nn.Module`` wrappers over the pure functions in :mod:`kd_lightning.losses`.

A term reads what it needs from a :class:`~kd_lightning.data.batch.PositionBatch` (the batch packed to its
target positions), returns an unweighted scalar, and carries the ``weight`` it is multiplied by in the
total. Add a term by writing one such class and one ``conf/loss/<name>.yaml``.

Divergence terms name their ``kd_target``: the distribution they compare the student with. The batch carries
it under that name in one of these forms:

* dense logits (``batch.dense_logits[name]``, key ``<name>_logits``), e.g. the online ``teacher``;
* dense probabilities (``batch.dense_probs[name]``, key ``<name>_probs`` without ``<name>_ids``);
* sparse rows (``batch.soft_labels[name]``, keys ``<name>_ids/_probs/_tail``), e.g. the ``prior`` and
  ``posterior`` stores, an offline teacher's top-k or random-sampled logits (``kdl teacher-logits``).

Every divergence runs on either form (see :mod:`kd_lightning.losses.divergences`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kd_lightning.data.batch import BatchFormWarning, PositionBatch
from kd_lightning.losses import divergences as D
from kd_lightning.losses import functional as LF


def _deprecated_mapping(batch: Any, term: str) -> PositionBatch:
    """A mapping in the key form, as earlier releases took it (one more release, with a warning)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{term} takes a PositionBatch (kd_lightning.data.batch), got {type(batch).__name__}; "
            "PositionBatch.pack(text_batch) packs a TextBatch"
        )
    warnings.warn(
        f"{term} was called with a {type(batch).__name__} of batch fields, which is deprecated and goes in the "
        "next release; pass PositionBatch.from_fields(fields)",
        BatchFormWarning,
        stacklevel=3,
    )
    return PositionBatch.from_fields(batch)


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

    def __call__(self, student_logits: torch.Tensor | None, batch: PositionBatch) -> torch.Tensor:
        if not isinstance(batch, PositionBatch):
            batch = _deprecated_mapping(batch, type(self).__name__)
        return super().__call__(student_logits, batch)

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


AGREEMENT_STORE = "proxy_agreement"
"""The store of the aligned proxy's probability of each observed teacher token (one entry per position)."""
WEIGHTINGS = ("none", "proxy_agreement")
"""How a divergence term weights its positions (``weighting``)."""


def agreement_weights(batch: PositionBatch) -> torch.Tensor:
    """Proxy-KD's position weights (..., ): the proxy's probability of the observed teacher token, divided by
    its mean over the batch's target positions, so the weights average 1 and the term keeps its scale.

    Where the proxy gives the teacher's token little probability it imitates the teacher badly, and its soft
    labels there are trusted less. A batch where the proxy gives every observed token probability 0 (stored
    as 0 in float16) falls back to equal weights. 0 off target.
    """
    if AGREEMENT_STORE not in batch.soft_labels:
        raise KeyError(
            f"weighting=proxy_agreement reads the {AGREEMENT_STORE!r} store (the aligned proxy's probability of "
            f"each teacher token), which this batch lacks; kdl builds it from the aligned proxy when a term "
            f"sets weighting=proxy_agreement (or add {AGREEMENT_STORE}_ids/_probs/_tail to the batch)"
        )
    valid = (batch.target_ids != LF.IGNORE_INDEX).float()
    agreement = gold_probability(batch, AGREEMENT_STORE).float() * valid
    mean = agreement.sum() / valid.sum().clamp_min(1.0)
    return torch.where(mean > 0, agreement / mean.clamp_min(1e-30), valid)


class DivergenceTerm(LossTerm):
    """A divergence between a target distribution and the student, averaged over target positions.

    Subclasses implement :meth:`per_position` on (log p, log q) buckets.

    Args:
        kd_target: what the student is compared with: a field of the batch (``teacher``, ``prior``,
            ``posterior``, ``offline_teacher``, ``teacher_logprobs``).
        weight: multiplier of this term in the total.
        distill_temperature: divides both sides' logits; the term is scaled by T².
        weighting: ``none`` (every target position counts alike) or ``proxy_agreement`` (Proxy-KD: a
            position counts by the aligned proxy's probability of the teacher's token, normalised over the
            batch; :func:`agreement_weights`). The weights are a batch statistic, computed once over the
            whole batch before any chunking.
    """

    chunkable = True  # a masked mean of per-position values (as long as ``forward`` is this one)
    weights_positions: ClassVar[bool] = True
    """``forward`` applies :meth:`position_weights` (opt-in per code, like the fast paths: a subclass that
    rewrites ``forward`` must declare it again before ``weighting`` may be set)."""

    def __init__(
        self,
        kd_target: str,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        super().__init__(weight)
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if weighting != "none" and not declared_capability(type(self), "weights_positions", ("forward",)):
            raise ValueError(
                f"{type(self).__name__} computes its own forward and does not apply weighting={weighting}; "
                f"use weighting=none, or declare weights_positions = True once its forward applies "
                f"position_weights()"
            )
        self.kd_target = kd_target
        self.distill_temperature = float(distill_temperature)
        self.weighting = weighting
        # stores only: a dense teacher comes from the module (online) rather than from a soft-label store
        self.soft_labels = () if kd_target == "teacher" else (kd_target,)
        if weighting == "proxy_agreement":
            self.soft_labels = (*self.soft_labels, AGREEMENT_STORE)
            self.uses_batch_statistics = True

    def per_position(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    weights_key: ClassVar[str] = f"{AGREEMENT_STORE}_weights"

    def prepare(self, batch: PositionBatch) -> dict[str, torch.Tensor]:
        return {} if self.weighting == "none" else {self.weights_key: agreement_weights(batch)}

    def position_weights(self, batch: PositionBatch) -> torch.Tensor | None:
        """(1, N) weights of the target positions, or None when every position counts alike. Read from
        the batch's prepared fields (the whole batch's, under chunking) or computed from ``batch``."""
        if self.weighting == "none":
            return None
        weights = batch.prepared.get(self.weights_key)
        return agreement_weights(batch) if weights is None else weights

    def weighted(self, values: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        """The masked mean of per-position ``values`` under :meth:`position_weights`."""
        weights = self.position_weights(batch)
        if weights is not None:
            values = values * weights
        return LF.masked_mean(values, batch.target_ids != LF.IGNORE_INDEX)

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        log_p, log_q = kd_target_log_probs(student_logits, batch, self.kd_target, self.distill_temperature)
        return self.weighted(self.per_position(log_p, log_q) * self.distill_temperature**2, batch)


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
        self,
        kd_target: str,
        beta: float = 0.5,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature, weighting)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def per_position(self, log_p, log_q):
        return D.generalized_jsd_buckets(log_p, log_q, self.beta)


class SkewForwardKL(DivergenceTerm):
    """DistiLLM's skew KL, KL(p ‖ α·p + (1 − α)·q)."""

    def __init__(
        self,
        kd_target: str,
        alpha: float = 0.1,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature, weighting)
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
        self,
        kd_target: str,
        head_mass: float = 0.5,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        super().__init__(kd_target, weight, distill_temperature, weighting)
        if not 0.0 < head_mass < 1.0:
            raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
        self.head_mass = float(head_mass)

    def per_position(self, log_p, log_q):
        return D.adaptive_kl_buckets(log_p, log_q, self.head_mass)


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


class SoftLabelKL(ForwardKL):
    """Deprecated (one release): ``ForwardKL(kd_target=...)`` is the same term; ``soft_labels`` named the
    store it compares with, which is what ``kd_target`` names for every divergence."""

    def __init__(
        self,
        soft_labels: str,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        warnings.warn(
            f"SoftLabelKL(soft_labels={soft_labels!r}) is ForwardKL(kd_target={soft_labels!r}), the same term; "
            "SoftLabelKL goes in the next release (in a loss YAML: _target_: kd_lightning.losses.ForwardKL, "
            f"kd_target: {soft_labels})",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(
            kd_target=soft_labels, weight=weight, distill_temperature=distill_temperature, weighting=weighting
        )
