"""``kdl evaluate``: a model's held-out NLL/perplexity, token calibration and ROUGE-L of greedy generations.

NLL and calibration come from one teacher-forced pass over the held-out teacher text. ROUGE-L compares
greedy generations (batched, KV-cached ``generate``, left-padded prompts) with the held-out teacher
responses on the first ``generation_limit`` prompts, as MiniLLM and DistiLLM report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.evaluation.metrics import rouge_l
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.loading import target_position_logits


@dataclass
class EvaluationSpec:
    """What ``kdl evaluate`` measures (``conf/evaluation/default.yaml``)."""

    generation_limit: int = 32
    """Held-out prompts to generate for (ROUGE-L); 0 skips generation."""
    max_new_tokens: int = 128
    """Greedy generation length cap."""
    batch_size: int = 8
    """Sequences per forward / generate call."""
    ece_bins: int = 15
    """Equal-width confidence bins of the calibration error."""

    def __post_init__(self) -> None:
        if self.generation_limit < 0 or self.max_new_tokens < 1 or self.batch_size < 1 or self.ece_bins < 1:
            raise ValueError(
                "evaluation: generation_limit must be >= 0 and max_new_tokens, batch_size, ece_bins >= 1"
            )


@torch.inference_mode()
def teacher_forced_metrics(
    model: nn.Module,
    corpus: TokenizedCorpus,
    pad_id: int,
    batch_size: int = 8,
    ece_bins: int = 15,
    desc: str = "eval",
) -> dict[str, float]:
    """Token-weighted NLL, perplexity, top-1 accuracy and ECE of next-token predictions on the responses.

    Sequences are sorted by length so that batches carry little padding.
    """
    from torchmetrics.functional.classification import binary_calibration_error

    dataset = SoftLabelDataset(corpus)
    order = sorted(range(len(dataset)), key=lambda i: len(corpus.sequence(i)))
    device = next(model.parameters()).device
    nll_sum, confidences, correct = 0.0, [], []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate([dataset[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["target_ids"] != IGNORE_INDEX
        logits = target_position_logits(model, batch["input_ids"], batch["attention_mask"], mask).float()
        targets = batch["target_ids"][mask]
        nll_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        top_prob, top_id = torch.softmax(logits, -1).max(-1)
        confidences.append(top_prob.cpu())
        correct.append((top_id == targets).long().cpu())
    tokens = sum(len(c) for c in correct)
    if tokens == 0:
        raise ValueError("the held-out corpus has no response tokens to evaluate on")
    confidence, hits = torch.cat(confidences), torch.cat(correct)
    nll = nll_sum / tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "token_accuracy": float(hits.float().mean()),
        "ece": float(binary_calibration_error(confidence, hits, n_bins=ece_bins, norm="l1")),
        "tokens": tokens,
    }


@torch.inference_mode()
def greedy_generations(
    model: nn.Module, tokenizer, corpus: TokenizedCorpus, limit: int, max_new_tokens: int, batch_size: int
) -> tuple[list[str], list[str]]:
    """Greedy continuations of the first ``limit`` held-out prompts, and the teacher's responses."""
    device = next(model.parameters()).device
    pad_id = int(tokenizer.pad_token_id)
    eos_id = tokenizer.eos_token_id
    indices = list(range(min(limit, len(corpus))))
    predictions, references = [], []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        prompts = [corpus.sequence(i)[: corpus.prompt_lens[i]] for i in chunk]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.from_numpy(prompt.astype("int64"))
            attention[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        predictions += tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
        references += [
            tokenizer.decode(corpus.sequence(i)[corpus.prompt_lens[i] :].tolist(), skip_special_tokens=True)
            for i in chunk
        ]
    return [p.strip() for p in predictions], [r.strip() for r in references]


def evaluate_model(
    model: nn.Module, tokenizer, heldout: TokenizedCorpus, spec: EvaluationSpec
) -> dict[str, float]:
    """Every metric of :class:`EvaluationSpec` for one model (put in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        metrics = teacher_forced_metrics(
            model, heldout, int(tokenizer.pad_token_id), spec.batch_size, spec.ece_bins
        )
        if spec.generation_limit:
            predictions, references = greedy_generations(
                model, tokenizer, heldout, spec.generation_limit, spec.max_new_tokens, spec.batch_size
            )
            metrics["rouge_l"] = rouge_l(predictions, references)
            metrics["generated"] = len(predictions)
    finally:
        model.train(was_training)
    return metrics
