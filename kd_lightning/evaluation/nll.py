"""Held-out negative log-likelihood and perplexity of a causal LM on teacher text."""

from __future__ import annotations

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
