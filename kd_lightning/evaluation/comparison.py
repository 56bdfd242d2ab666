"""Students compared over seeds and prompt by prompt: mean ± std per variant, paired bootstrap intervals.

A variant trained with several seeds has one score per seed; the table gives their mean and standard
deviation (``ddof=1``). Two variants are compared on the same held-out prompts: per prompt, each
variant's score is averaged over its seeds, the differences are taken, and a percentile bootstrap over
prompts (resampling prompts with replacement) gives the interval of their mean. An interval that excludes
0 says the difference holds across these prompts; it says nothing about other prompts or other seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS: tuple[tuple[str, str, bool], ...] = (
    ("nll", "NLL", False),
    ("rouge_l", "ROUGE-L", True),
    ("similarity", "similarity", True),
    ("answer_tokens", "answer tokens", True),
)
"""(key, column title, higher is better) of the figures compared; length has no better side, but its
difference is reported the same way."""


@dataclass
class StudentScores:
    """One trained student's figures on one held-out set."""

    variant: str
    seed: int | None
    heldout: str
    metrics: dict[str, float]
    per_record: dict[str, list[Any]] = field(default_factory=dict)


def bootstrap_interval(
    differences: Sequence[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``differences`` and the percentile bootstrap interval of that mean (resampling items)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one difference")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def _per_prompt(scores: list[StudentScores], key: str) -> np.ndarray | None:
    """(records,) the seed-mean of one variant's per-record figure, or None if it was not measured."""
    found = [np.asarray(s.per_record[key], dtype=np.float64) for s in scores if key in s.per_record]
    if not found or len(found) != len(scores) or len({len(f) for f in found}) != 1:
        return None
    return np.mean(found, axis=0)


def compare_seeds(
    scores: list[StudentScores], compare_to: str | None = None, resamples: int = 10_000
) -> list[dict[str, Any]]:
    """One row per (held-out set, variant): mean, std and seeds of every metric, and against ``compare_to``
    the paired difference of each per-prompt metric with its bootstrap interval."""
    rows = []
    for heldout in dict.fromkeys(s.heldout for s in scores):
        on_set = [s for s in scores if s.heldout == heldout]
        variants = list(dict.fromkeys(s.variant for s in on_set))
        base = [s for s in on_set if s.variant == compare_to]
        for variant in variants:
            mine = [s for s in on_set if s.variant == variant]
            row: dict[str, Any] = {"heldout": heldout, "variant": variant, "seeds": len(mine)}
            for key, _, _ in METRICS:
                values = [s.metrics[key] for s in mine if key in s.metrics]
                if values:
                    row[key] = float(np.mean(values))
                    row[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
                if base and variant != compare_to:
                    ours, theirs = _per_prompt(mine, key), _per_prompt(base, key)
                    if ours is not None and theirs is not None and len(ours) == len(theirs):
                        mean, low, high = bootstrap_interval(ours - theirs, resamples)
                        row[f"{key}_diff"], row[f"{key}_diff_low"], row[f"{key}_diff_high"] = mean, low, high
                        row[f"{key}_prompts"] = len(ours)
            rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    if key not in row:
        return ""
    std = row.get(f"{key}_std", float("nan"))
    return f"{row[key]:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")


def _diff(row: dict[str, Any], key: str, digits: int) -> str:
    if f"{key}_diff" not in row:
        return ""
    return (
        f"{row[f'{key}_diff']:+.{digits}f} [{row[f'{key}_diff_low']:+.{digits}f}, "
        f"{row[f'{key}_diff_high']:+.{digits}f}]"
    )


def comparison_markdown(rows: list[dict[str, Any]], compare_to: str | None) -> str:
    """Markdown: per held-out set, a table of mean ± std over seeds and the paired differences."""
    digits = {"nll": 4, "rouge_l": 4, "similarity": 4, "answer_tokens": 1}
    parts = []
    for heldout in dict.fromkeys(r["heldout"] for r in rows):
        present = [(k, t) for k, t, _ in METRICS if any(k in r for r in rows if r["heldout"] == heldout)]
        header = "| variant | seeds |" + "".join(f" {t} |" for _, t in present)
        if compare_to:
            header += "".join(f" Δ{t} vs {compare_to} [95% CI] |" for k, t in present)
        lines = [
            f"**{heldout}**",
            "",
            header,
            "|---|---:|" + "---:|" * len(present) * (2 if compare_to else 1),
        ]
        for row in (r for r in rows if r["heldout"] == heldout):
            cells = "".join(f" {_cell(row, k, digits[k])} |" for k, _ in present)
            if compare_to:
                cells += "".join(f" {_diff(row, k, digits[k])} |" for k, _ in present)
            lines.append(f"| {row['variant']} | {row['seeds']} |{cells}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def comparison_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bars of NLL and ROUGE-L per variant (error bars: std over seeds), one row of panels per held-out set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["heldout"] for r in rows))
    keys = [(k, t) for k, t, _ in METRICS[:2] if any(k in r for r in rows)]
    figure, axes = plt.subplots(len(sets), len(keys), figsize=(5 * len(keys), 3.2 * len(sets)), squeeze=False)
    for i, heldout in enumerate(sets):
        mine = [r for r in rows if r["heldout"] == heldout]
        for j, (key, title) in enumerate(keys):
            axis = axes[i][j]
            values = [r.get(key, np.nan) for r in mine]
            errors = [0.0 if np.isnan(r.get(f"{key}_std", np.nan)) else r[f"{key}_std"] for r in mine]
            axis.bar(range(len(mine)), values, yerr=errors, capsize=4, color="#4c72b0")
            axis.set_xticks(
                range(len(mine)), [r["variant"] for r in mine], rotation=30, ha="right", fontsize=8
            )
            finite = [v for v in values if not np.isnan(v)]
            if finite:
                spread = max(finite) - min(finite) or abs(max(finite)) * 0.05 or 1.0
                axis.set_ylim(min(finite) - spread, max(finite) + spread)
            axis.set_title(f"{heldout}: {title}", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
