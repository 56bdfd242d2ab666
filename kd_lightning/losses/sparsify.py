"""Sparse rows (ids, probs, tail) from teacher logits: top-k, or random-sampled (Sparse Logit Sampling).

Both produce the soft-label store's format ``(ids (N, K), probs (N, K), tail (N,))``, so every divergence
in :mod:`kd_lightning.losses.divergences` runs on them unchanged.

* **top-k** keeps the k most likely ids and the remaining mass as the tail: deterministic, but biased
  (the tail is one lump).
* **sampled** draws K ids from the teacher (with replacement), merges repeats, and uses the empirical
  frequencies as probabilities with an empty tail (arXiv 2503.16870). Its expectation over draws is the
  teacher distribution, so the forward-KL gradient with respect to the student is unbiased.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def topk_rows(
    teacher_logits: torch.Tensor, k: int, distill_temperature: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """Top-k target from teacher logits (..., V): ids (..., k), probs (..., k), tail (...)."""
    probs = torch.softmax(teacher_logits.float() / distill_temperature, dim=-1)
    values, ids = probs.topk(k, dim=-1)
    return ids, values, (1.0 - values.sum(-1)).clamp_min(0.0)


@torch.no_grad()
def sampled_rows(
    teacher_logits: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    distill_temperature: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """K draws per position from the teacher, repeats merged: ids (..., K), probs (..., K), tail (...) = 0.

    A repeated id keeps its first slot with probability count / K; its other slots get probability 0
    (entries of probability 0 count as absent in every divergence).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    shape = teacher_logits.shape[:-1]
    probs = torch.softmax(
        teacher_logits.float().reshape(-1, teacher_logits.shape[-1]) / distill_temperature, dim=-1
    )
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    ids, _ = draws.sort(dim=-1)
    position = torch.arange(k, device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first_index = torch.where(first, position, torch.zeros_like(position)).cummax(dim=-1).values
    weights = torch.zeros_like(ids, dtype=torch.float32).scatter_add_(
        1, first_index, torch.full_like(ids, 1.0 / k, dtype=torch.float32)
    )
    return ids.reshape(*shape, k), weights.reshape(*shape, k), torch.zeros(shape, device=ids.device)
