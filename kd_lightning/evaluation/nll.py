"""Held-out negative log-likelihood and perplexity of a causal LM on teacher text."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.evaluation.evaluate import teacher_forced_metrics


def heldout_nll(
    model: nn.Module, corpus: TokenizedCorpus, pad_id: int, batch_size: int = 8, desc: str = "eval"
) -> dict[str, float]:
    """Token-weighted mean NLL (nats) of the response tokens, its perplexity and the token count."""
    was_training = model.training
    model.eval()
    try:
        metrics = teacher_forced_metrics(model, corpus, pad_id, batch_size, desc=desc)
    finally:
        model.train(was_training)
    return {key: metrics[key] for key in ("nll", "ppl", "tokens")}


def require_finite(metrics: Mapping[str, Any], what: str, fix: str) -> None:
    """Refuse to cache a result whose NLL is NaN or infinite (it would also be invalid JSON)."""
    nll = metrics.get("nll")
    if isinstance(nll, float) and not math.isfinite(nll):
        raise ValueError(f"{what} has a non-finite held-out NLL ({nll}): {fix}")
