"""What a mix of loss terms asks the student to become: the mixture at the optimum of the weighted loss.

For one position, ``h·CE + Σ_i w_i·KL(t_i ‖ q)`` is minimised, over all q, by
``q* = (h·δ + Σ_i w_i·t_i) / (h + Σ_i w_i)`` (δ: the observed token; in expectation over the data, the
data distribution). Each target is the observed token's one-hot plus an estimate:

* the prior ``t = (1/γ)·p_ngram + (1 − 1/γ)·δ``;
* the posterior ``t = κ/(κ+R)·prior + R/(κ+R)·p_proxy`` (the R draws' counts in expectation).

So ``q* = (1 − λ)·δ + λ_ngram·p_ngram + λ_proxy·p_proxy`` with ``λ = λ_ngram + λ_proxy`` the estimates' share.
With one prior term (h = 1): ``λ = w / (γ·(1 + w))`` (0.25 at w = 1, γ = 2). A fluent student pays for
every bit of λ that goes to an estimate worse than itself. A decoupled term with ``target_weight`` 0 leaves
the observed token to the CE (it never lowers q*(δ)); its estimate only ranks the other tokens, with the
weight ``w·nontarget_weight``, which the same formula gives as its *nominal* λ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TermShare:
    """One soft-label term's part of the optimum's mixture."""

    name: str
    kd_target: str
    weight: float
    """The term's effective weight (``w``, times ``nontarget_weight`` when decoupled)."""
    ngram: float
    """λ_ngram: the n-gram's share of q* through this term."""
    proxy: float
    """λ_proxy: the proxy's share of q* through this term."""
    decoupled: bool
    caps_observed: bool
    """Whether the term lowers the observed token's probability at the optimum (coupled, or α > 0)."""

    @property
    def share(self) -> float:
        return self.ngram + self.proxy


def estimate_shares(kd_target: str, gamma: float, concentration: float, rounds: int) -> tuple[float, float]:
    """(n-gram share, proxy share) of a target distribution (1 minus their sum is the observed one-hot)."""
    if kd_target == "prior":
        return 1.0 / gamma, 0.0
    if kd_target == "posterior":
        prior_part = concentration / (concentration + rounds)
        return prior_part / gamma, rounds / (concentration + rounds)
    return 0.0, 0.0


def implied_mixture(
    terms: Mapping[str, Any],
    hard_ce_weight: float,
    gamma: float,
    concentration: float = 8.0,
    rounds: int = 16,
) -> list[TermShare]:
    """Each prior/posterior term's share of the optimum's mixture (see the module docstring).

    ``terms`` maps names to loss terms (anything with ``kd_target`` and ``weight``; a decoupled term's
    ``decoupled``, ``target_weight``, ``nontarget_weight``); terms of other targets are left out.
    """
    found = []
    for name, term in terms.items():
        target = getattr(term, "kd_target", None)
        if target not in ("prior", "posterior"):
            continue
        decoupled = bool(getattr(term, "decoupled", False))
        weight = float(term.weight) * (float(getattr(term, "nontarget_weight", 1.0)) if decoupled else 1.0)
        found.append((name, target, weight, decoupled, not decoupled or float(term.target_weight) > 0))
    total = float(hard_ce_weight) + sum(weight for _, _, weight, _, _ in found)
    shares = []
    for name, target, weight, decoupled, caps in found:
        ngram, proxy = estimate_shares(target, gamma, concentration, rounds)
        scale = weight / total if total > 0 else 0.0
        shares.append(TermShare(name, target, weight, ngram * scale, proxy * scale, decoupled, caps))
    return shares


def nominal_lambda(shares: list[TermShare]) -> float:
    """The estimates' total share of the optimum (λ), summed over the terms."""
    return sum(share.share for share in shares)
