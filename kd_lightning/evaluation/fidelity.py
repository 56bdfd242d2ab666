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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.soft_labels import SparseRows
from kd_lightning.models.forward import target_position_logits

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


@dataclass
class FidelitySpec:
    """What ``kdl fidelity`` compares (``conf/fidelity.yaml``).

    The prior is built for every (n, γ) in ``ngram_orders × gammas``; the posterior for every R in
    ``sampling_rounds``, on the prior of the configured ``estimator.prior``.
    """

    records: int = 32
    """First training records whose target positions are scored (the stores are built for these)."""
    ngram_orders: list[int] = field(default_factory=lambda: [2, 3, 5, 8])
    gammas: list[float] = field(default_factory=lambda: [1.5, 2.0, 4.0])
    sampling_rounds: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    label_smoothing: list[float] = field(default_factory=lambda: [0.1])
    api_evidence_weights: list[float] = field(default_factory=list)
    """λ of the posterior that also counts the API's top-K log-probs (``data.logprobs``), one row each, at
    the R of ``estimator.posterior``; with ``data.logprobs`` the API's top-K alone gets a row too."""
    top_k: int = 10
    """k of the top-k recall."""
    batch_size: int = 4
    """Sequences per teacher forward."""

    def __post_init__(self) -> None:
        for name in ("ngram_orders", "gammas", "sampling_rounds", "label_smoothing", "api_evidence_weights"):
            setattr(self, name, list(getattr(self, name)))
        if self.records < 1 or self.top_k < 1 or self.batch_size < 1:
            raise ValueError("fidelity: records, top_k and batch_size must be >= 1")
        if any(w <= 0 for w in self.api_evidence_weights):
            raise ValueError(f"fidelity.api_evidence_weights must be > 0, got {self.api_evidence_weights}")
        if any(g < 1 for g in self.gammas):
            raise ValueError(f"fidelity.gammas must be >= 1 (γ = 1 is the pure n-gram), got {self.gammas}")


@dataclass
class Estimate:
    """One estimate to score: a label, its settings, and its rows over the scored positions."""

    name: str
    settings: dict[str, Any]
    rows: Callable[[torch.Tensor], EstimateRows]
    """``observed token ids (N,) -> EstimateRows`` (the hard-label baselines need the observed tokens)."""
    kind: str = ""
    """The family (``prior``, ``posterior``, ...): one line per family in ``kdl report``'s plots."""


def store_estimate(store, vocab_size: int) -> Callable[[torch.Tensor], EstimateRows]:
    return lambda observed: sparse_estimate(store.all_rows(), vocab_size)


@torch.no_grad()
def score_estimates(
    teacher: torch.nn.Module,
    corpus,
    pad_id: int,
    vocab_size: int,
    estimates: list[Estimate],
    top_k: int = 10,
    batch_size: int = 4,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Score every estimate against the teacher's true next-token distributions on ``corpus``'s targets.

    The teacher runs once per batch of sequences; each batch's true rows are compared with the matching
    rows of every estimate, so no (N, V) matrix is ever held. Returns summary rows (mean and median KL,
    mean TV and top-k recall) and the per-position arrays (``<name>/kl`` etc.).
    """
    dataset = SoftLabelDataset(corpus)
    offsets = corpus.target_offsets()
    observed = torch.cat(
        [
            torch.from_numpy(dataset[i]["target_ids"][dataset[i]["target_ids"] != IGNORE_INDEX])
            for i in range(len(corpus))
        ]
    )
    readers = [(e, e.rows(observed)) for e in estimates]
    per_position: dict[str, list[torch.Tensor]] = {}
    device = next(teacher.parameters()).device
    for start in range(0, len(corpus), batch_size):
        stop = min(start + batch_size, len(corpus))
        batch = collate([dataset[i] for i in range(start, stop)], pad_id)
        mask = batch.target_mask
        logits = target_position_logits(
            teacher, batch.input_ids.to(device), batch.attention_mask.to(device), mask.to(device)
        )
        true = torch.softmax(logits.float().cpu()[:, :vocab_size], dim=-1)
        first, last = int(offsets[start]), int(offsets[stop])
        if len(true) != last - first or not torch.equal(batch.target_ids[mask], observed[first:last]):
            raise RuntimeError("teacher positions do not line up with the estimate rows; rebuild the stores")
        for estimate, reader in readers:
            scored = estimate_fidelity(
                true, lambda rows, r=reader, f=first: r(slice(rows.start + f, rows.stop + f)), top_k=top_k
            )
            for metric, values in scored.items():
                per_position.setdefault(f"{estimate.name}/{metric}", []).append(values)
    arrays = {key: torch.cat(parts).numpy() for key, parts in per_position.items()}
    rows = []
    for estimate in estimates:
        kl = arrays[f"{estimate.name}/kl"]
        rows.append(
            {
                "estimate": estimate.name,
                "kind": estimate.kind or estimate.name,
                **estimate.settings,
                "kl": float(kl.mean()),
                "kl_median": float(np.median(kl)),
                "tv": float(arrays[f"{estimate.name}/tv"].mean()),
                "topk_recall": float(arrays[f"{estimate.name}/topk_recall"].mean()),
                "positions": len(kl),
            }
        )
    return rows, arrays


def fidelity_table(rows: list[dict[str, Any]], top_k: int) -> str:
    """Markdown table of :func:`score_estimates` rows."""
    lines = [
        f"| estimate | mean KL(true ‖ est.) | median KL | mean TV | top-{top_k} recall |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['estimate']} | {row['kl']:.3f} | {row['kl_median']:.3f} | {row['tv']:.3f} | "
            f"{row['topk_recall']:.3f} |"
        )
    return "\n".join(lines)
