"""Estimate fidelity: how close an estimated next-token distribution comes to a teacher's true one.

Closed-source KD trains on *estimates* of the teacher's distributions (one-hot labels, label smoothing,
the n-gram prior, the proxy posterior). With an open teacher treated as closed, its true distributions are
known, so each estimate can be scored per position:

* ``KL(true ‖ estimate)``: nats the student would lose by fitting the estimate instead of the truth. An
  estimate with zero mass where the teacher has some (one-hot labels) has infinite KL; estimates are
  therefore floored, ``(e + ε) / (1 + V·ε)`` with ``ε = 1e-8`` by default, and the floor is reported.
* total variation ``½·Σ|true − estimate|`` (no floor needed; in [0, 1]);
* top-k recall ``|top_k(true) ∩ top_k(estimate)| / k``.

Sparse estimates (the store's top-k + tail) are expanded with the tail spread evenly over the ids outside
the stored set, the same reading the rest of the library uses. Everything works in row chunks, so a
(N, V) dense copy of the whole estimate never exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_lightning.data.soft_labels import SparseRows

EstimateRows = Callable[[slice], torch.Tensor]


def one_hot_estimate(observed: torch.Tensor, vocab_size: int) -> EstimateRows:
    """The hard label as an estimate: all mass on the observed token (what plain SFT fits)."""
    return lambda rows: torch.nn.functional.one_hot(observed[rows], vocab_size).float()


def label_smoothing_estimate(observed: torch.Tensor, vocab_size: int, smoothing: float = 0.1) -> EstimateRows:
    """``(1 − ε)·onehot + ε/V``: label smoothing as an estimate."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")

    def rows_of(rows: slice) -> torch.Tensor:
        hot = torch.nn.functional.one_hot(observed[rows], vocab_size).float()
        return hot * (1.0 - smoothing) + smoothing / vocab_size

    return rows_of


def sparse_estimate(estimate: SparseRows, vocab_size: int) -> EstimateRows:
    """A soft-label store's rows (top-k + tail) as dense rows, tail spread over the ids not stored."""
    return lambda rows: estimate.slice(rows.start, rows.stop).to_dense(vocab_size)


@torch.no_grad()
def estimate_fidelity(
    true_probs: torch.Tensor,
    estimate: EstimateRows,
    top_k: int = 10,
    floor: float = 1e-8,
    chunk_rows: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-position fidelity of an estimate against the true distributions.

    Args:
        true_probs: (N, V) the teacher's true next-token probabilities at N positions.
        estimate: ``rows (slice) -> (n, V)`` dense estimate rows (see the ``*_estimate`` builders).
        top_k: k of the top-k recall.
        floor: ε of the KL's floor on the estimate.
        chunk_rows: rows per chunk.

    Returns:
        ``kl``, ``tv``, ``topk_recall``: (N,) float tensors.
    """
    n, vocab = true_probs.shape
    if not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
    out = {name: torch.empty(n) for name in ("kl", "tv", "topk_recall")}
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        p = true_probs[rows].float()
        e = estimate(rows).float()
        if e.shape != p.shape:
            raise ValueError(f"estimate rows have shape {tuple(e.shape)}, true rows {tuple(p.shape)}")
        floored = (e + floor) / (1.0 + vocab * floor)
        log_ratio = torch.where(p > 0, p.clamp_min(1e-45).log() - floored.log(), torch.zeros_like(p))
        out["kl"][rows] = (p * log_ratio).sum(-1).clamp_min(0.0)
        out["tv"][rows] = 0.5 * (p - e).abs().sum(-1)
        true_top = p.topk(top_k, dim=-1).indices
        est_top = e.topk(top_k, dim=-1).indices
        hits = (true_top.unsqueeze(-1) == est_top.unsqueeze(-2)).any(-1).sum(-1)
        out["topk_recall"][rows] = hits.float() / top_k
    return out


def summarize_fidelity(per_position: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over positions (the figures a report table shows)."""
    return {name: float(values.mean()) for name, values in per_position.items()}
