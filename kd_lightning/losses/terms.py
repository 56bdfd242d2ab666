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

from kd_lightning.data.batch import BatchFormWarning, PositionBatch, _from_fields
from kd_lightning.losses import divergences as D
from kd_lightning.losses import functional as LF
from kd_lightning.losses.decoupled import decoupled_buckets
from kd_lightning.losses.targets import decoupled_log_probs, kd_target_log_probs
from kd_lightning.losses.weighting import (
    AGREEMENT_STORE,
    STORES_READ,
    WEIGHTINGS,
    agreement_weights,
    reliability_weights,
)


def _deprecated_mapping(batch: Any, term: str) -> PositionBatch:
    """A mapping in the key form, as earlier releases took it (one more release, with a warning)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{term} takes a PositionBatch (kd_lightning.data.batch), got {type(batch).__name__}; "
            "PositionBatch.pack(text_batch) packs a TextBatch"
        )
    warnings.warn(
        f"{term} was called with a {type(batch).__name__} of batch fields, which is deprecated and goes in the "
        "will be removed in v0.3.0; pass a PositionBatch (kd_lightning.data.batch) built from typed fields",
        BatchFormWarning,
        stacklevel=3,
    )
    return _from_fields(batch)


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

    Three class attributes opt a term into fast paths; all are read through :func:`declared_capability`, so
    a subclass that overrides ``forward`` (or ``per_position``) is run as written until it re-declares them:

    * ``chunkable``: the value is a token-weighted mean of independent per-position values, so computing it
      over chunks of rows and re-weighting is exact (``loss_chunk_size``).
    * ``fused_sparse_kind``: ``"hard_ce"`` or ``"forward_kl"`` — the term equals that closed form, so the
      one-pass sparse computation (:mod:`kd_lightning.losses.fused_sparse`) may stand in for it.
    * ``compilable``: ``forward`` is plain tensor code over the logits and the batch's tensors, so
      ``trainer.compile=true`` compiles it too (inductor fuses the float cast, the log-softmax and its
      backward into a pass or two over the (N, V) logits instead of one per op).
    """

    chunkable: ClassVar[bool] = False
    fused_sparse_kind: ClassVar[str | None] = None
    compilable: ClassVar[bool] = False
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

    def can_compile(self) -> bool:
        """Whether this term's code declares itself safe to ``torch.compile`` (see the class docstring)."""
        return bool(declared_capability(type(self), "compilable", ("forward",)))

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
    compilable = True

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        return LF.hard_cross_entropy(student_logits, batch.target_ids)


class DivergenceTerm(LossTerm):
    """A divergence between a target distribution and the student, averaged over target positions.

    Subclasses implement :meth:`per_position` on (log p, log q) buckets.

    Args:
        kd_target: what the student is compared with: a field of the batch (``teacher``, ``prior``,
            ``posterior``, ``offline_teacher``, ``teacher_logprobs``, ``teacher:<name>``, ``teacher_mixture``).
        weight: multiplier of this term in the total.
        distill_temperature: divides both sides' logits; the term is scaled by T².
        weighting: ``none``, ``proxy_agreement`` or ``prior_reliability`` (see
            :mod:`kd_lightning.losses.weighting`).
        decoupled: split the divergence at the observed token (Decoupled KD): ``target_weight`` times its
            part on "the observed token or not" plus ``nontarget_weight`` times its part on the other
            tokens, renormalised (:func:`kd_lightning.losses.decoupled.decoupled_buckets`). With
            ``target_weight`` 0 the target only ranks the alternatives and never caps the observed token.
        target_weight, nontarget_weight: α and β of the decoupled form (ignored unless ``decoupled``).
        reliability_pseudocount: m of ``weighting=prior_reliability``'s ``n(c) / (n(c) + m)``.
    """

    chunkable = True  # a masked mean of per-position values (as long as ``forward`` is this one)
    weights_positions: ClassVar[bool] = True
    """``forward`` applies :meth:`position_weights` (opt-in per code, like the fast paths: a subclass that
    rewrites ``forward`` must declare it again before ``weighting`` may be set)."""
    decouples: ClassVar[bool] = True
    """``forward`` honours ``decoupled`` (opt-in per code, as ``weights_positions``)."""

    def __init__(
        self,
        kd_target: str,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
        decoupled: bool = False,
        target_weight: float = 1.0,
        nontarget_weight: float = 1.0,
        reliability_pseudocount: float = 10.0,
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
        if decoupled and not declared_capability(type(self), "decouples", ("forward",)):
            raise ValueError(
                f"{type(self).__name__} computes its own forward and cannot be decoupled; set decoupled=false"
            )
        if not (target_weight >= 0 and nontarget_weight >= 0):
            raise ValueError(
                f"target_weight and nontarget_weight must be >= 0, got {target_weight} and {nontarget_weight}"
            )
        if not reliability_pseudocount > 0:
            raise ValueError(f"reliability_pseudocount must be > 0, got {reliability_pseudocount}")
        self.kd_target = kd_target
        self.distill_temperature = float(distill_temperature)
        self.weighting = weighting
        self.decoupled = bool(decoupled)
        self.target_weight, self.nontarget_weight = float(target_weight), float(nontarget_weight)
        self.reliability_pseudocount = float(reliability_pseudocount)
        # stores only: a dense teacher comes from the module (online) rather than from a soft-label store
        own = () if kd_target == "teacher" else (kd_target,)
        self.soft_labels = tuple(dict.fromkeys((*own, *STORES_READ[weighting])))
        if weighting == "proxy_agreement":  # a batch statistic (a class may already declare one)
            self.uses_batch_statistics = True

    def per_position(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def fused_kind(self) -> str | None:
        """The closed form of the fused path, which the decoupled form is not."""
        return None if self.decoupled else super().fused_kind()

    weights_key: ClassVar[str] = f"{AGREEMENT_STORE}_weights"

    def prepare(self, batch: PositionBatch) -> dict[str, torch.Tensor]:
        if self.weighting != "proxy_agreement":
            return {}
        return {self.weights_key: agreement_weights(batch)}

    def position_weights(self, batch: PositionBatch) -> torch.Tensor | None:
        """(1, N) weights of the target positions, or None when every position counts alike. Proxy-KD's are
        read from the batch's prepared fields (the whole batch's, under chunking) or computed from ``batch``."""
        if self.weighting == "none":
            return None
        if self.weighting == "prior_reliability":
            return reliability_weights(batch, self.reliability_pseudocount)
        weights = batch.prepared.get(self.weights_key)
        return agreement_weights(batch) if weights is None else weights

    def weighted(self, values: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        """The masked mean of per-position ``values`` under :meth:`position_weights`."""
        weights = self.position_weights(batch)
        if weights is not None:
            values = values * weights
        return LF.masked_mean(values, batch.target_ids != LF.IGNORE_INDEX)

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        t = self.distill_temperature
        if self.decoupled:
            log_p, log_q, gold, log_q_hat = decoupled_log_probs(student_logits, batch, self.kd_target, t)
            values = decoupled_buckets(
                log_p, log_q, gold, self.target_weight, self.nontarget_weight, self.per_position, log_q_hat
            )
        else:
            log_p, log_q = kd_target_log_probs(student_logits, batch, self.kd_target, t)
            values = self.per_position(log_p, log_q)
        return self.weighted(values * t**2, batch)


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
        decoupled: bool = False,
        target_weight: float = 1.0,
        nontarget_weight: float = 1.0,
        reliability_pseudocount: float = 10.0,
    ) -> None:
        super().__init__(
            kd_target,
            weight,
            distill_temperature,
            weighting,
            decoupled,
            target_weight,
            nontarget_weight,
            reliability_pseudocount,
        )
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
        decoupled: bool = False,
        target_weight: float = 1.0,
        nontarget_weight: float = 1.0,
        reliability_pseudocount: float = 10.0,
    ) -> None:
        super().__init__(
            kd_target,
            weight,
            distill_temperature,
            weighting,
            decoupled,
            target_weight,
            nontarget_weight,
            reliability_pseudocount,
        )
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
        decoupled: bool = False,
        target_weight: float = 1.0,
        nontarget_weight: float = 1.0,
        reliability_pseudocount: float = 10.0,
    ) -> None:
        super().__init__(
            kd_target,
            weight,
            distill_temperature,
            weighting,
            decoupled,
            target_weight,
            nontarget_weight,
            reliability_pseudocount,
        )
        if not 0.0 < head_mass < 1.0:
            raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
        self.head_mass = float(head_mass)

    def per_position(self, log_p, log_q):
        return D.adaptive_kl_buckets(log_p, log_q, self.head_mass)
