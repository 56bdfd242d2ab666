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

from kd_lightning.data.batch import PositionBatch
from kd_lightning.data.token_alignment import VocabularyMatch
from kd_lightning.losses import divergences as D
from kd_lightning.losses import functional as LF
from kd_lightning.losses.functional import masked_mean
from kd_lightning.losses.terms import DivergenceTerm


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


# ---------------------------------------------------------------------------------------------- terms
def sorted_probs_l1(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """``Σ_i |sort(p_s)_i − sort(p_t)_i|`` over the last dimension, the shorter zero-padded: (..., A), (..., B) → (...)."""
    p_s = p_s.sort(dim=-1, descending=True).values
    p_t = p_t.sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1)


def aligned_target_mask(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """Target positions that have a ``kd_target`` distribution: not ignored, aligned (the module's
    ``<kd_target>_aligned`` field, all when absent), and, for sparse rows, holding a stored entry (a row with
    none, all its mass in the tail, marks a position a foreign teacher's tokenization could not be aligned
    to: a teacher's top-k or sampled row always stores its most likely token)."""
    mask = batch.target_ids != LF.IGNORE_INDEX
    aligned = batch.prepared.get(f"{kd_target}_aligned")
    if aligned is not None:
        mask = mask & aligned.bool()
    if kd_target in batch.soft_labels:
        rows = batch.soft_labels[kd_target]
        mask = mask & (rows.probs.float().sum(-1) > 0)
    return mask


def target_probs(batch: PositionBatch, kd_target: str) -> torch.Tensor:
    """Dense probabilities (..., V_t) of the ``kd_target`` distribution (float32, no gradient)."""
    if kd_target in batch.dense_logits:
        return torch.softmax(batch.dense_logits[kd_target].detach().float(), dim=-1)
    if kd_target in batch.dense_probs:
        probs = batch.dense_probs[kd_target].detach().float().clamp_min(0)
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    raise KeyError(
        f"the batch has no {kd_target!r} distribution; run a teacher online (module=foreign_teacher) or "
        f"connect the {kd_target} store"
    )


class CrossVocabularyTerm(DivergenceTerm):
    """A divergence whose target may live on another vocabulary than the student's (a foreign teacher).

    Values are averaged over *all* target positions, unaligned ones counting 0, so the weight means the
    same per token as every other term's and chunking / micro-batching stay exact.
    """

    chunkable = True  # a per-position value over target positions (re-declared: forward is overridden)

    def per_position_values(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def forward(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        values = self.per_position_values(student_logits, batch)
        aligned = aligned_target_mask(batch, self.kd_target)
        values = torch.where(aligned, values, torch.zeros_like(values))
        return LF.masked_mean(values, batch.target_ids != LF.IGNORE_INDEX)


class UniversalLogitDistillation(CrossVocabularyTerm):
    """ULD (arXiv 2402.12030): the sorted-probability L1 distance, over any two vocabularies.

    Dense target: :func:`uld_per_position`. Sparse rows (K stored entries + tail): the K largest of both
    sides sorted, plus one bucket for the rest (``|rest_student − tail|``); exact when K covers the
    vocabulary. Compares shapes only, so pair it with ``hard_ce``.
    """

    def __init__(self, kd_target: str = "teacher", weight: float = 1.0) -> None:
        super().__init__(kd_target, weight)

    def per_position_values(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        p_s = torch.softmax(student_logits.float(), dim=-1)
        if self.kd_target not in batch.soft_labels:
            return sorted_probs_l1(p_s, target_probs(batch, self.kd_target))
        rows = batch.soft_labels[self.kd_target]
        p_t = rows.probs.detach().float().clamp_min(0).sort(dim=-1, descending=True).values
        k = min(p_t.shape[-1], p_s.shape[-1])
        top_s = p_s.topk(k, dim=-1).values
        rest_s = (1.0 - top_s.sum(-1)).clamp_min(0)
        return sorted_probs_l1(top_s, p_t) + (rest_s - rows.tail.detach().float().clamp_min(0)).abs()


class GoldHybrid(CrossVocabularyTerm):
    """GOLD's hybrid (TRL ``uld_use_hybrid_loss``): exact JSD(β) on tokens both vocabularies spell alike,
    ULD on the rest.

    * matched part: the generalised JSD (β; 0 = forward KL) between the two distributions restricted to the
      M matched tokens plus one shared bucket holding each side's unmatched mass;
    * unmatched part: ULD between the two sides' unmatched probabilities (sparse rows: the stored ones);
    * ``matched_weight`` / ``unmatched_weight``: both None = TRL's adaptive weighting, M / V_teacher and
      1 − M / V_teacher.

    The match comes from the two tokenizers (:func:`kd_lightning.data.token_alignment.match_vocabularies`,
    set by ``module=foreign_teacher``); without one, a target of the student's width is matched to itself.
    """

    def __init__(
        self,
        kd_target: str = "teacher",
        beta: float = 0.5,
        matched_weight: float | None = None,
        unmatched_weight: float | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(kd_target, weight)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if (matched_weight is None) != (unmatched_weight is None):
            raise ValueError("set both matched_weight and unmatched_weight, or neither (adaptive weighting)")
        if matched_weight is not None and (matched_weight < 0 or unmatched_weight < 0):
            raise ValueError("matched_weight and unmatched_weight must be >= 0")
        self.beta = float(beta)
        self.matched_weight, self.unmatched_weight = matched_weight, unmatched_weight
        self.match: VocabularyMatch | None = None
        self._tables: dict[tuple[str, int, int], tuple[torch.Tensor, ...]] = {}

    def set_vocabulary_match(self, match: VocabularyMatch) -> None:
        self.match, self._tables = match, {}

    def tables(self, device: torch.device, v_s: int, v_t: int) -> tuple[torch.Tensor, ...]:
        """(student ids, teacher ids, teacher→student map (V_t,) with -1, student matched (V_s,), teacher
        matched (V_t,)) on ``device``; cached per device and widths."""
        key = (str(device), v_s, v_t)
        if key not in self._tables:
            match = self.match
            if match is None:
                if v_s != v_t:
                    raise ValueError(
                        f"gold_hybrid compares a {v_t}-token target with a {v_s}-token student but has no "
                        "vocabulary match; use module=foreign_teacher, which matches the two tokenizers"
                    )
                match = VocabularyMatch.identity(v_s)
            s_ids = torch.as_tensor(match.student_ids, device=device)
            t_ids = torch.as_tensor(match.teacher_ids, device=device)
            s_ids, t_ids = s_ids[(s_ids < v_s) & (t_ids < v_t)], t_ids[(s_ids < v_s) & (t_ids < v_t)]
            to_student = torch.full((v_t,), -1, dtype=torch.long, device=device).index_put_((t_ids,), s_ids)
            s_matched = torch.zeros(v_s, dtype=torch.bool, device=device).index_fill_(0, s_ids, True)
            t_matched = torch.zeros(v_t, dtype=torch.bool, device=device).index_fill_(0, t_ids, True)
            self._tables[key] = (s_ids, t_ids, to_student, s_matched, t_matched)
        return self._tables[key]

    def weights(self, matched: int, v_t: int) -> tuple[float, float]:
        if self.matched_weight is not None:
            return self.matched_weight, float(self.unmatched_weight)
        share = matched / max(v_t, 1)
        return share, 1.0 - share

    def per_position_values(self, student_logits: torch.Tensor, batch: PositionBatch) -> torch.Tensor:
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
        v_s = log_q.shape[-1]
        sparse = batch.soft_labels.get(self.kd_target)
        if sparse is None:
            p = target_probs(batch, self.kd_target)
            s_ids, t_ids, _, s_matched, t_matched = self.tables(log_q.device, v_s, p.shape[-1])
            p_matched = p[..., t_ids]
            p_rest = (1.0 - p_matched.sum(-1)).clamp_min(0)
            unmatched = sorted_probs_l1(log_q[..., ~s_matched].exp(), p[..., ~t_matched])
            v_t = p.shape[-1]
        else:
            v_t = self.match.teacher_size if self.match is not None else v_s
            s_ids, t_ids, to_student, s_matched, _ = self.tables(log_q.device, v_s, v_t)
            probs = sparse.probs.detach().float().clamp_min(0)
            ids = sparse.ids.long().clamp(0, v_t - 1)
            mapped = to_student[ids]
            hit = (mapped >= 0) & (probs > 0)
            p_matched = torch.where(hit, probs, torch.zeros_like(probs))
            p_rest = sparse.tail.detach().float().clamp_min(0) + (probs - p_matched).sum(-1)
            log_q_k = log_q.gather(-1, mapped.clamp_min(0))
            q_unmatched = log_q[..., ~s_matched].exp()
            k = min(probs.shape[-1], q_unmatched.shape[-1])
            unmatched = sorted_probs_l1(q_unmatched.topk(k, dim=-1).values, probs - p_matched)
            return self._mix(p_matched, p_rest, log_q_k, hit, unmatched, len(s_ids), v_t)
        log_q_k = log_q[..., s_ids]
        present = torch.ones_like(p_matched, dtype=torch.bool)
        return self._mix(p_matched, p_rest, log_q_k, present, unmatched, len(s_ids), v_t)

    def _mix(self, p_k, p_rest, log_q_k, present, unmatched, matched, v_t) -> torch.Tensor:
        """The weighted sum of the matched JSD (K buckets + the shared rest) and the unmatched ULD."""
        z = (p_k.sum(-1) + p_rest).clamp_min(1e-30)
        log_p = torch.cat([p_k, p_rest.unsqueeze(-1)], -1).div(z.unsqueeze(-1)).log().clamp_min(D.LOG_FLOOR)
        log_q_k = log_q_k.masked_fill(~present, D.LOG_FLOOR)
        masked = log_q_k.masked_fill(~present, torch.finfo(torch.float32).min / 4)
        log_q_rest = LF.log1mexp(torch.logsumexp(masked, dim=-1).clamp(max=0))
        log_q = torch.cat([log_q_k, log_q_rest.unsqueeze(-1)], -1).clamp_min(D.LOG_FLOOR)
        w_matched, w_unmatched = self.weights(matched, v_t)
        matched_value = D.generalized_jsd_buckets(log_p.detach(), log_q, self.beta)
        return w_matched * matched_value + w_unmatched * unmatched
