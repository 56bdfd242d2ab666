"""Markdown tables of held-out results, and one-line summaries of soft-label stores (logs and reports)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kd_lightning.data.soft_labels import SoftLabelStore


def results_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of held-out results."""
    extra = [
        (key, title)
        for key, title in (
            ("token_accuracy", "token acc."),
            ("ece", "ECE"),
            ("rouge_l", "ROUGE-L"),
            ("reverse_kl", "reverse KL to teacher"),
            ("rollout_seconds_per_step", "rollout s/step"),
            ("update_seconds_per_step", "update s/step"),
        )
        if any(key in row for row in rows)
    ]
    lines = [
        "| model | held-out NLL (nats/token) | perplexity | tokens | train s |"
        + "".join(f" {title} |" for _, title in extra),
        "|---|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for row in rows:
        train_s = f"{row['train_seconds']:.0f}" if "train_seconds" in row else ""
        cells = "".join(f" {row[key]:.4f} |" if key in row else " |" for key, _ in extra)
        lines.append(
            f"| {row['name']} | {row['nll']:.4f} | {row['ppl']:.2f} | {row['tokens']} | {train_s} |{cells}"
        )
    return "\n".join(lines)


def evaluation_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of ``kdl evaluate`` rows."""
    # question-set columns (``<set>/mc_accuracy``, ``<set>/answer_match``) in the order they first appear
    questions = [
        key
        for key in dict.fromkeys(k for row in rows for k in row)
        if key.endswith(("/mc_accuracy", "/answer_match"))
    ]
    if any("reverse_kl" in row for row in rows):
        questions.insert(0, "reverse_kl")
    lines = [
        "| model | NLL | perplexity | token acc. | ECE | ROUGE-L | generated |"
        + "".join(f" {q} |" for q in questions),
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(questions),
    ]
    for row in rows:
        rouge = f"{row['rouge_l']:.4f}" if "rouge_l" in row else ""
        cells = "".join(f" {row[q]:.3f} |" if q in row else " |" for q in questions)
        lines.append(
            f"| {row['name']} | {row['nll']:.4f} | {row['ppl']:.2f} | {row['token_accuracy']:.4f} | "
            f"{row['ece']:.4f} | {rouge} | {row.get('generated', '')} |{cells}"
        )
    return "\n".join(lines)


def summarize_store(store: SoftLabelStore) -> dict[str, float]:
    """Mean top-1 probability, mean tail mass and mean entropy over the stored entries (for logs and reports)."""
    rows = store.all_rows()
    p = np.asarray(rows.probs, dtype=np.float64)
    entropy = -(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0)).sum(1)
    return {
        "rows": len(p),
        "mean_top1": float(p[:, 0].mean()),
        "mean_tail": float(np.asarray(rows.tail).mean()),
        "mean_entropy_topk_nats": float(entropy.mean()),
    }
