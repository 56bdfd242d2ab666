"""Loss terms over the student's hidden states and output head, in chunks of rows (fused path).

The plain path materialises logits (N, V) for N target positions, then each term builds more (N, V)
float32 tensors (log-softmax, probabilities, gradients). At V = 49,152 that is ~200 KB per row per tensor.
Here the rows are processed in chunks under activation checkpointing: a chunk's logits and loss
intermediates exist only while that chunk is processed (once forward, once again in backward), so peak
memory scales with ``chunk_size`` instead of N. Terms reduce by token-weighted means, so
``Σ chunk_mean · chunk_count / total_count`` equals the whole-batch value exactly, gradients included.

That identity holds only for terms that are token-weighted means of per-position values, so chunking is
opt-in: a term whose code declares ``chunkable`` (:meth:`~kd_lightning.losses.terms.LossTerm.can_chunk`) is
chunked; any other term (a user's ``forward`` override, say) runs as written on the whole (1, N, V) logits.

When every chunked term has a fused closed form (hard CE and forward KLs against sparse stores, the
closed-source recipe; :mod:`~kd_lightning.losses.fused_sparse`) and the head is a linear layer, the
gradients are taken in the same pass as the values (:class:`_FusedLinearSparse`): per chunk the logits,
their gradient in closed form, and its products with the head and the hidden states, three matrix
products and one softmax, against the checkpointed path's four and two. That is what the naive path costs
too, in ``chunk_size`` rows of memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kd_lightning.data.batch import IGNORE_INDEX, PositionBatch
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_parts, fused_sparse_terms


def chunked_terms(
    hidden: torch.Tensor,
    head: nn.Module,
    terms: Mapping[str, nn.Module],
    batch: PositionBatch,
    chunk_size: int,
    fuse: bool = False,
) -> dict[str, torch.Tensor]:
    """Each term's value as if computed on ``head(hidden)`` at once, without holding (N, V) logits.

    Args:
        hidden: (N, H) final hidden states at the target positions.
        head: the output layer mapping H → V (e.g. ``model.get_output_embeddings()``).
        terms: name → loss term taking ``(logits (1, n, V), batch with (1, n, ...) fields)``.
        batch: the packed batch, per-position fields shaped (1, N, ...).
        chunk_size: rows per chunk.
        fuse: compute the terms that qualify in one pass per chunk (:mod:`kd_lightning.losses.fused_sparse`).

    Returns:
        name → scalar, equal in value and gradient to the unchunked computation. Terms that do not declare
        themselves chunkable are computed once on the whole logits (exact, without the memory saving).
    """
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1, got {chunk_size}")
    whole = {name: term for name, term in terms.items() if not _can_chunk(term)}
    terms = {name: term for name, term in terms.items() if name not in whole}
    n = hidden.shape[0]
    names = list(terms)
    for term in terms.values():  # batch-level statistics (ATKD's split, agreement weights): whole batch
        batch = batch.with_prepared(term.prepare(batch) if hasattr(term, "prepare") else {})
    if fuse and names and not whole and isinstance(head, nn.Linear):
        vocab = head.out_features
        if all(fusable(term, batch, vocab) for term in terms.values()):
            values = _FusedLinearSparse.apply(hidden, head.weight, head.bias, terms, batch, chunk_size)
            return {name: values[i] for i, name in enumerate(names)}
    valid = batch.target_ids[0] != IGNORE_INDEX
    total_count = valid.sum().clamp_min(1)
    total = hidden.new_zeros(len(names), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        chunk_batch = batch.positions(rows)

        def chunk_values(h: torch.Tensor, chunk_batch=chunk_batch) -> torch.Tensor:
            logits = head(h).unsqueeze(0)
            group = {}
            if fuse:
                group = {n: t for n, t in terms.items() if fusable(t, chunk_batch, logits.shape[-1])}
            fused = fused_sparse_terms(logits, group, chunk_batch) if len(group) >= 2 else {}
            return torch.stack(
                [
                    (fused[name] if name in fused else terms[name](logits, chunk_batch)).float()
                    for name in names
                ]
            )

        values = checkpoint(chunk_values, hidden[rows], use_reentrant=False)
        total = total + values * valid[rows].sum()
    total = total / total_count
    values = {name: total[i] for i, name in enumerate(names)}
    if whole:
        logits = head(hidden).unsqueeze(0)
        values.update({name: term(logits, batch) for name, term in whole.items()})
    return values


def _can_chunk(term: nn.Module) -> bool:
    can_chunk = getattr(term, "can_chunk", None)
    return bool(can_chunk()) if callable(can_chunk) else False


def _linear_sparse_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    terms: Mapping[str, nn.Module],
    batch: PositionBatch,
    chunk_size: int,
    scales: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Values (T,) of the fused terms over ``head(hidden)``, chunk by chunk, and the gradients of
    ``Σ_t scales[t] · value_t`` with respect to hidden, weight and bias."""
    valid = batch.target_ids[0] != IGNORE_INDEX
    total_count = valid.sum().clamp_min(1).float()
    values = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    w32 = weight.float()
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, hidden.shape[0]))
        h = hidden[rows]
        logits = torch.nn.functional.linear(h, weight, bias).unsqueeze(0)
        chunk_values, grad, row_coef, ids, coef = fused_sparse_parts(logits, terms, batch.positions(rows))
        share = valid[rows].sum().float() / total_count  # a chunk's mean counts by its share of the tokens
        values += torch.stack(chunk_values).float() * share
        row_scale = (scales.unsqueeze(-1) * row_coef).sum(0) * share
        grad.mul_(row_scale.unsqueeze(-1)).scatter_add_(
            -1, ids, (scales.view(-1, 1, 1) * coef).sum(0) * share
        )
        grad_hidden[rows] = grad @ w32
        grad_weight.addmm_(grad.t(), h.float())
        if grad_bias is not None:
            grad_bias += grad.sum(0)
    return values, grad_hidden, grad_weight, grad_bias


class _FusedLinearSparse(torch.autograd.Function):
    """The fused sparse terms over ``linear(hidden, weight, bias)`` with their gradients taken in forward.

    Forward computes the gradients of ``Σ_t weight_t · value_t`` (the terms' own weights: the loss
    DistillModule sums). Backward scales them when the incoming gradient is proportional to those weights
    (it is for that sum, and under DDP's per-rank scaling), and otherwise computes them again for the
    gradient it was given, so the result is exact either way.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, batch, chunk_size):
        loss_weights = torch.tensor([float(t.weight) for t in terms.values()], device=hidden.device)
        with torch.no_grad():
            values, *grads = _linear_sparse_pass(hidden, weight, bias, terms, batch, chunk_size, loss_weights)
        ctx.save_for_backward(hidden, weight, bias, loss_weights, *[g for g in grads if g is not None])
        ctx.terms, ctx.batch, ctx.chunk_size, ctx.has_bias = terms, batch, chunk_size, bias is not None
        return values

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, loss_weights, *grads = ctx.saved_tensors
        grad_out = grad_out.float()
        scale = _common_scale(grad_out, loss_weights)
        if scale is None:  # not the weighted sum the gradients were taken for: take them for this one
            with torch.no_grad():
                _, *grads = _linear_sparse_pass(
                    hidden, weight, bias, ctx.terms, ctx.batch, ctx.chunk_size, grad_out
                )
            grads = [g for g in grads if g is not None]
            scale = 1.0
        grad_hidden, grad_weight = grads[0] * scale, grads[1] * scale
        grad_bias = grads[2] * scale if ctx.has_bias else None
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias, None, None, None


def _common_scale(grad_out: torch.Tensor, loss_weights: torch.Tensor) -> float | None:
    """s with ``grad_out == s · loss_weights`` (to float tolerance), or None."""
    if not bool((loss_weights > 0).any()):
        return None
    scale = float((grad_out * loss_weights).sum() / (loss_weights * loss_weights).sum())
    if torch.allclose(grad_out, scale * loss_weights, rtol=1e-5, atol=1e-12):
        return scale
    return None
