"""Held-out negative log-likelihood and perplexity of a causal LM on teacher text."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.loading import target_position_logits


@torch.inference_mode()
def heldout_nll(
    model: nn.Module, corpus: TokenizedCorpus, pad_id: int, batch_size: int = 8, desc: str = "eval"
) -> dict[str, float]:
    """Token-weighted mean NLL (nats) of the response tokens and its perplexity.

    Sequences are sorted by length so that batches carry little padding.
    """
    was_training = model.training
    model.eval()
    dataset = SoftLabelDataset(corpus)
    order = sorted(range(len(dataset)), key=lambda i: len(corpus.sequence(i)))
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate([dataset[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["target_ids"] != IGNORE_INDEX
        logits = target_position_logits(model, batch["input_ids"], batch["attention_mask"], mask)
        nll_sum += float(
            torch.nn.functional.cross_entropy(logits.float(), batch["target_ids"][mask], reduction="sum")
        )
        tokens += int(mask.sum())
    model.train(was_training)
    nll = nll_sum / max(tokens, 1)
    return {"nll": nll, "ppl": math.exp(nll), "tokens": tokens}
