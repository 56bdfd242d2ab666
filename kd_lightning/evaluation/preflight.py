"""``kdl preflight``'s arithmetic: will these loss weights help this student, before any training?

The optimum of the weighted loss mixes each estimate into the student's target with a share λ
(:mod:`kd_lightning.evaluation.mixture`). On the validation split we know, per response token, the
student's probability of the token the teacher wrote and each estimate's. The NLL of the mixture
``(1 − λ)·p_student + λ·p_estimate`` at those tokens is what the student would score if it became exactly
what the loss asks; against the student's own NLL it says whether mixing that much of the estimate in can
pay at all. Where the estimate is far worse than the student (the n-gram at 6.6 nats against a student at
1.7), any sizeable λ costs NLL; where it knows what the student does not, a small λ can gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAMBDA_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.25, 0.5)
"""The shares at which the mixture's NLL is reported."""


def nll(p: np.ndarray) -> float:
    """Mean −log p (nats/token), with p floored at 1e-12."""
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def mixture_nll(p_student: np.ndarray, p_estimate: np.ndarray, share: float) -> float:
    """NLL of ``(1 − share)·p_student + share·p_estimate`` at the observed tokens (P,)."""
    return nll((1.0 - share) * p_student + share * p_estimate)


def best_share(p_student: np.ndarray, p_estimate: np.ndarray) -> tuple[float, float]:
    """(λ, NLL) of the lowest mixture NLL over λ in [0, 0.5] (a fine grid), λ = 0 when nothing helps."""
    grid = np.concatenate([[0.0], np.geomspace(1e-4, 0.5, 60)])
    values = [mixture_nll(p_student, p_estimate, float(share)) for share in grid]
    i = int(np.argmin(values))
    return float(grid[i]), float(values[i])


@dataclass
class EstimateCheck:
    """One estimate on the validation split, against the student."""

    name: str
    nll: float
    top1: float
    """Share of tokens where the estimate's most likely token is the observed one."""
    best_share: float
    best_nll: float
    curve: dict[float, float]
    """λ → the mixture's NLL."""


def check_estimate(
    name: str, p_student: np.ndarray, p_estimate: np.ndarray, top1: np.ndarray
) -> EstimateCheck:
    share, value = best_share(p_student, p_estimate)
    curve = {s: mixture_nll(p_student, p_estimate, s) for s in LAMBDA_GRID}
    return EstimateCheck(name, nll(p_estimate), float(np.mean(top1)), share, value, curve)


def verdict(
    term: str,
    estimate: EstimateCheck,
    student_nll: float,
    share: float,
    mixed_nll: float,
    caps_observed: bool,
    settings: str,
) -> str:
    """One line: what this term's share of the optimum does to the validation NLL (``mixed_nll``: the
    mixture's NLL at that share), and what to try."""
    if not caps_observed:
        return (
            f"{term}: decoupled without its target part: it leaves the observed token to the CE and only ranks "
            f"the other tokens by the {estimate.name} ({estimate.nll:.2f} nats/token, top-1 {estimate.top1:.0%}); "
            "its effect is not on this NLL: compare on val_nll"
        )
    head = (
        f"{term}: {estimate.name} {estimate.nll:.2f} nats/token vs the student's {student_nll:.2f}; at {settings} "
        f"the student's optimum mixes {share:.1%} of it: NLL {student_nll:.3f} -> {mixed_nll:.3f}"
    )
    if mixed_nll > student_nll + 1e-3:
        keep = estimate.best_share
        room = f"shares up to {keep:.1%} do not hurt" if keep > 0 else "no share of it lowers the NLL"
        return (
            f"{head}: expect a worse NLL; try a lower weight or a larger gamma ({room}); decoupled=true with "
            f"target_weight=0 lifts the cap on the observed token but still teaches the {estimate.name}'s ranking "
            "of the other tokens, which cost more on a fluent student (README: paper_sweep): compare on val_nll"
        )
    return f"{head}: can help (the best share, {estimate.best_share:.1%}, gives {estimate.best_nll:.3f})"
