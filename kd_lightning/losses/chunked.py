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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kd_lightning.data.batch import IGNORE_INDEX, PositionBatch
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_terms


def chunked_terms(
    hidden: torch.Tensor,
    head: nn.Module,
    terms: Mapping[str, nn.Module],
    batch: PositionBatch | Mapping[str, torch.Tensor],
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
    batch = PositionBatch.from_fields(batch)
    for term in terms.values():  # batch-level statistics (e.g. ATKD's split) from the whole batch
        batch = batch.with_prepared(term.prepare(batch) if hasattr(term, "prepare") else {})
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
