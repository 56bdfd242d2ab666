"""Hard CE and forward KLs against sparse targets in one pass over the student's logits.

The closed-source recipe ``hard_ce + prior_kl + posterior_kl`` is, term by term, three log-softmaxes over
(N, V) logits and three dense gradients summed by autograd: at V = 49,152 each is 200 KB per position, and on
a CPU the step is bound by that memory traffic. Every one of these terms is linear in ``log q`` at a few
buckets (an id, or the "outside the stored ids" bucket), so their sum has the gradient

    ∂L/∂z = q · c_row + Σ_(row, id) s_(row, id) · e_id,

one softmax times a per-row scalar plus a sparse correction. :func:`fused_sparse_terms` computes the values
with one softmax, keeps that (N, V) buffer for backward, and turns it into the gradient in place. The
values and gradients equal the separate terms' (tested). It is opt-in per class: it stands in only for
terms whose code declares ``fused_sparse_kind`` (``HardCrossEntropy``, ``ForwardKL``), at
``distill_temperature`` 1, against a sparse target that stores fewer ids than the vocabulary. A subclass
that overrides ``forward`` or ``per_position`` loses the declaration (see
:func:`kd_lightning.losses.terms.declared_capability`) and is always run as written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kd_lightning.data.batch import IGNORE_INDEX, PositionBatch
from kd_lightning.losses.divergences import LOG_FLOOR
from kd_lightning.losses.functional import log1mexp
from kd_lightning.losses.terms import LossTerm


def fusable(term: LossTerm, batch: PositionBatch, vocab_size: int) -> bool:
    """Whether ``term`` declares a closed form the fused computation reproduces, on this batch."""
    kind = term.fused_kind()
    if kind == "hard_ce":
        return True
    if kind == "forward_kl":
        rows = batch.soft_labels.get(term.kd_target)
        return term.distill_temperature == 1.0 and rows is not None and rows.ids.shape[-1] < vocab_size
    return False


class _FusedSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, probs, row_coef, ids, coef):
        # values are computed outside; this node only carries the gradient (see fused_sparse_terms).
        # ``probs`` is the softmax buffer; backward turns it into the gradient in place.
        ctx.save_for_backward(probs, row_coef, ids, coef)
        ctx.logits_dtype = logits.dtype
        return logits.new_zeros(row_coef.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        probs, row_coef, ids, coef = ctx.saved_tensors
        # grad_out (T,) per term; row_coef (T, N); coef (T, N, M) over ids (N, M)
        grad = probs.mul_((grad_out.unsqueeze(-1) * row_coef).sum(0).unsqueeze(-1))
        grad.scatter_add_(-1, ids, (grad_out.view(-1, 1, 1) * coef).sum(0))
        return grad.to(ctx.logits_dtype), None, None, None, None


def fused_sparse_parts(
    logits: torch.Tensor, terms: Mapping[str, LossTerm], batch: PositionBatch
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The values of ``terms`` (all :func:`fusable`) on logits (1, N, V), and their gradients in closed form.

    Returns ``(values, probs, row_coef, ids, coef)``: per term its value (a detached scalar), the (N, V)
    float32 softmax, and the gradient of term t as ``probs · row_coef[t] (per row) + Σ coef[t] at ids``
    (row_coef (T, N), ids (N, M), coef (T, N, M)). The softmax buffer may be turned into a gradient in
    place by the caller.
    """
    refused = [name for name, term in terms.items() if not fusable(term, batch, logits.shape[-1])]
    if refused:
        raise ValueError(f"terms {refused} do not declare a fused form; compute them with their own forward")
    z = logits[0].detach()
    n = z.shape[0]
    target = batch.target_ids[0]
    valid = target != IGNORE_INDEX
    count = valid.sum().clamp_min(1).float()
    gold = target.clamp_min(0)
    with torch.no_grad():  # the one (N, V) buffer: softmax, built in place
        zf = z.detach().float()
        top = zf.amax(-1, keepdim=True)
        probs = (zf - top).exp_()
        total_mass = probs.sum(-1, keepdim=True)
        probs.div_(total_mass)
        lse = (top + total_mass.log()).squeeze(-1)
    names = list(terms)
    values, row_coefs, id_blocks, coef_blocks = [], [], [], []
    for name in names:
        term = terms[name]
        if term.fused_kind() == "hard_ce":
            log_q = z.float().gather(-1, gold.unsqueeze(-1)).squeeze(-1) - lse  # no grad path: values only
            values.append(torch.where(valid, -log_q, torch.zeros_like(log_q)).sum().detach() / count)
            weight = valid.float() / count
            row_coefs.append(weight)
            id_blocks.append(gold.unsqueeze(-1))
            coef_blocks.append(-weight.unsqueeze(-1))
            continue
        rows = batch.soft_labels[term.kd_target]
        ids = rows.ids[0].long()
        p = rows.probs[0].float().clamp_min(0.0)
        tail = rows.tail[0].float().clamp_min(0.0)
        norm = (p.sum(-1) + tail).clamp_min(1e-30)
        p, tail = p / norm.unsqueeze(-1), tail / norm
        present = p > 0
        with torch.no_grad():
            log_q_k = (z.float().gather(-1, ids) - lse.unsqueeze(-1)).masked_fill(~present, -float("inf"))
            log_q_out = log1mexp(torch.logsumexp(log_q_k, dim=-1))
            q_k = log_q_k.exp()
            q_out = log_q_out.exp().clamp_min(1e-30)
            log_p = torch.where(present, p.clamp_min(1e-30).log(), torch.zeros_like(p))
            kl = (p * (log_p - log_q_k.clamp_min(LOG_FLOOR))).masked_fill(~present, 0.0).sum(-1)
            tail_log = torch.where(
                tail > 0, tail.clamp_min(1e-30).log() - log_q_out.clamp_min(LOG_FLOOR), torch.zeros_like(tail)
            )
            kl = kl + tail * tail_log
            position_weights = term.position_weights(batch)  # Proxy-KD's agreement weights, or None
            weight = valid.float() / count
            if position_weights is not None:
                weight = weight * position_weights[0].float()
            values.append((weight * torch.where(valid, kl, torch.zeros_like(kl))).sum())
            # as in the separate terms, a bucket whose log q is below LOG_FLOOR (a -inf logit) has no gradient
            p_live = p * (log_q_k > LOG_FLOOR)
            t_live = tail * (log_q_out > LOG_FLOOR)
            # d/dz of -Σ p_k log q_k - t log q_out = q·(Σp + t·(1 - 1/q_out)) - Σ p_k e_k + (t/q_out)·Σ q_k e_k
            row_coefs.append(weight * (p_live.sum(-1) + t_live * (1.0 - 1.0 / q_out)))
            id_blocks.append(ids)
            coef_blocks.append(
                weight.unsqueeze(-1) * (-p_live + (t_live / q_out).unsqueeze(-1) * q_k * present)
            )
    width = sum(block.shape[-1] for block in id_blocks)
    all_ids = torch.cat(id_blocks, dim=-1)
    coef = z.new_zeros((len(names), n, width), dtype=torch.float32)
    start = 0
    for t, block in enumerate(coef_blocks):
        coef[t, :, start : start + block.shape[-1]] = block
        start += block.shape[-1]
    return values, probs, torch.stack(row_coefs), all_ids, coef


def fused_sparse_terms(
    logits: torch.Tensor, terms: Mapping[str, LossTerm], batch: PositionBatch
) -> dict[str, torch.Tensor]:
    """Values of ``terms`` (all :func:`fusable`) on logits (1, N, V) and a packed batch; one dense pass.

    Raises ``ValueError`` for a term that is not :func:`fusable` (its own code must run instead).

    Each value equals ``term(logits, batch)`` (masked mean over target positions), with the same gradient.
    """
    values, probs, row_coef, ids, coef = fused_sparse_parts(logits, terms, batch)
    carrier = _FusedSparse.apply(logits[0], probs, row_coef, ids, coef)
    return {name: values[t] + carrier[t] for t, name in enumerate(terms)}
