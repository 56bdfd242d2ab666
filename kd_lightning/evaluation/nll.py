"""Held-out negative log-likelihood and perplexity of a causal LM on teacher text."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.evaluation.evaluate import (
    TEACHER_FORCED_ECE_BINS,
    teacher_forced_metrics,
    teacher_forced_setting,
)


def heldout_nll(
    model: nn.Module,
    corpus: TokenizedCorpus,
    pad_id: int,
    batch_size: int = 8,
    desc: str = "eval",
    keep_pass: bool = False,
) -> dict[str, Any]:
    """Token-weighted mean NLL (nats) of the response tokens, its perplexity and the token count; with
    ``keep_pass``, also the whole teacher-forced pass (``teacher_forced``: accuracy, ECE, per-record NLL and
    what it was computed with), which a later evaluation of the same model on the same records reuses
    (:func:`~kd_lightning.evaluation.evaluate.evaluate_model`) instead of running it again."""
    was_training = model.training
    model.eval()
    try:
        metrics = teacher_forced_metrics(model, corpus, pad_id, batch_size, desc=desc)
    finally:
        model.train(was_training)
    found: dict[str, Any] = {key: metrics[key] for key in ("nll", "ppl", "tokens")}
    if keep_pass:
        found["teacher_forced"] = {
            **metrics,
            **teacher_forced_setting(batch_size, TEACHER_FORCED_ECE_BINS, model, corpus),
        }
    return found


def require_finite(metrics: Mapping[str, Any], what: str, fix: str) -> None:
    """Refuse to cache a result whose NLL is NaN or infinite (it would also be invalid JSON)."""
    nll = metrics.get("nll")
    if isinstance(nll, float) and not math.isfinite(nll):
        raise ValueError(f"{what} has a non-finite held-out NLL ({nll}): {fix}")
