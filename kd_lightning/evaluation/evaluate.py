"""``kdl evaluate``: a model's held-out NLL/perplexity, token calibration and ROUGE-L of greedy generations.

NLL and calibration come from one teacher-forced pass over the held-out teacher text. ROUGE-L compares
greedy generations (batched, KV-cached ``generate``, left-padded prompts) with the held-out teacher
responses on the first ``generation_limit`` prompts, as MiniLLM and DistiLLM report it; optionally also
their semantic similarity (a sentence encoder) and their length. Per-record figures are kept
(``per_record``), so two models can be compared prompt by prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.evaluation.greedy import generate_greedy
from kd_lightning.evaluation.metrics import rouge_l, rouge_l_each
from kd_lightning.evaluation.question_sets import load_question_set, score_question_set
from kd_lightning.evaluation.reverse_kl import sampled_reverse_kl
from kd_lightning.evaluation.similarity import semantic_similarity
from kd_lightning.models.forward import target_position_logits

TEACHER_FORCED_ECE_BINS = 15
"""Calibration bins of a teacher-forced pass when none are asked for (``EvaluationSpec.ece_bins``'s default)."""


@dataclass
class EvaluationSpec:
    """What ``kdl evaluate`` measures (``conf/evaluation/default.yaml``)."""

    generation_limit: int = 32
    """Held-out prompts to generate for (ROUGE-L); 0 skips generation."""
    max_new_tokens: int = 128
    """Greedy generation length cap."""
    batch_size: int = 8
    """Sequences per forward / generate call."""
    ece_bins: int = TEACHER_FORCED_ECE_BINS
    """Equal-width confidence bins of the calibration error."""
    question_sets: list[str] = field(default_factory=list)
    """Q/A and multiple-choice sets: names from ``EVALS_SETS`` (OpenAI evals) or JSONL paths."""
    question_limit: int | None = None
    """First questions of each set (None: all)."""
    answer_max_new_tokens: int = 8
    """Greedy reply length for answer matching."""
    reverse_kl_limit: int = 0
    """Held-out prompts on which the student's samples are scored against the teacher (``reverse_kl``,
    MiniLLM's objective); 0 skips it. Needs an open teacher (``teacher=``)."""
    reverse_kl_max_new_tokens: int = 64
    """Sampled response length for the reverse KL."""
    semantic_similarity: bool = False
    """Also score each greedy answer by its embedding's cosine similarity to the teacher's answer
    (all-MiniLM-L6-v2, :mod:`kd_lightning.evaluation.similarity`)."""

    def __post_init__(self) -> None:
        self.question_sets = list(self.question_sets)
        if self.generation_limit < 0 or self.max_new_tokens < 1 or self.batch_size < 1 or self.ece_bins < 1:
            raise ValueError(
                "evaluation: generation_limit must be >= 0 and max_new_tokens, batch_size, ece_bins >= 1"
            )
        if self.reverse_kl_limit < 0 or self.reverse_kl_max_new_tokens < 1:
            raise ValueError("evaluation: reverse_kl_limit must be >= 0 and reverse_kl_max_new_tokens >= 1")
        if self.answer_max_new_tokens < 1 or (self.question_limit is not None and self.question_limit < 1):
            raise ValueError("evaluation: answer_max_new_tokens and question_limit must be >= 1")


def teacher_forced_setting(
    batch_size: int, ece_bins: int, model: nn.Module, corpus: TokenizedCorpus
) -> dict[str, Any]:
    """What a teacher-forced pass's figures depend on besides the model's weights: two passes with equal
    settings over the same records give the same figures, so one can stand for the other."""
    return {
        "batch_size": int(batch_size),
        "ece_bins": int(ece_bins),
        "device": str(next(model.parameters()).device),
        "records": corpus.fingerprint,
    }


@torch.inference_mode()
def teacher_forced_metrics(
    model: nn.Module,
    corpus: TokenizedCorpus,
    pad_id: int,
    batch_size: int = 8,
    ece_bins: int = TEACHER_FORCED_ECE_BINS,
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
    record_nll = [0.0] * len(dataset)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        batch = collate([dataset[i] for i in chunk], pad_id)
        batch = batch.to(device)
        mask = batch.target_mask
        logits = target_position_logits(model, batch.input_ids, batch.attention_mask, mask).float()
        targets = batch.target_ids[mask]
        token_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        nll_sum += float(token_nll.sum())
        per_row = torch.zeros(mask.shape[0], dtype=torch.float64).index_add_(
            0, mask.nonzero()[:, 0].cpu(), token_nll.double().cpu()
        )
        for row, index in enumerate(chunk):
            record_nll[index] = float(per_row[row]) / max(corpus.num_targets(index), 1)
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
        "record_nll": record_nll,
    }


def greedy_generations(
    model: nn.Module, tokenizer, corpus: TokenizedCorpus, limit: int, max_new_tokens: int, batch_size: int
) -> tuple[list[str], list[str]]:
    """Greedy continuations of the first ``limit`` held-out prompts, and the teacher's responses."""
    indices = list(range(min(limit, len(corpus))))
    prompts = [corpus.sequence(i)[: corpus.prompt_lens[i]].tolist() for i in indices]
    predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    references = [
        tokenizer.decode(
            corpus.sequence(i)[corpus.prompt_lens[i] :].tolist(), skip_special_tokens=True
        ).strip()
        for i in indices
    ]
    return predictions, references


def evaluate_model(
    model: nn.Module,
    tokenizer,
    heldout: TokenizedCorpus,
    spec: EvaluationSpec,
    teacher: nn.Module | None = None,
    teacher_forced: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Every metric of :class:`EvaluationSpec` for one model (put in eval mode, restored afterwards).

    ``teacher`` is needed only for ``spec.reverse_kl_limit > 0``. ``teacher_forced``: a pass over the same
    records by the same weights, kept when the student was scored after training
    (:func:`~kd_lightning.evaluation.nll.heldout_nll`); it stands for this one's when its settings are equal.
    """
    was_training = model.training
    model.eval()
    try:
        setting = teacher_forced_setting(spec.batch_size, spec.ece_bins, model, heldout)
        if teacher_forced is not None and all(teacher_forced.get(k) == v for k, v in setting.items()):
            metrics: dict[str, Any] = {k: v for k, v in teacher_forced.items() if k not in setting}
        else:
            metrics = teacher_forced_metrics(
                model, heldout, int(tokenizer.pad_token_id), spec.batch_size, spec.ece_bins
            )
        per_record: dict[str, list[Any]] = {"nll": metrics.pop("record_nll")}
        if spec.generation_limit:
            predictions, references = greedy_generations(
                model, tokenizer, heldout, spec.generation_limit, spec.max_new_tokens, spec.batch_size
            )
            metrics["rouge_l"] = rouge_l(predictions, references)
            metrics["generated"] = len(predictions)
            per_record["rouge_l"] = rouge_l_each(predictions, references)
            lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions]
            per_record["answer_tokens"] = lengths
            metrics["answer_tokens"] = sum(lengths) / len(lengths)
            if spec.semantic_similarity:
                per_record["similarity"] = semantic_similarity(predictions, references)
                metrics["similarity"] = sum(per_record["similarity"]) / len(predictions)
            per_record["answer"] = predictions
        if spec.reverse_kl_limit:
            if teacher is None:
                raise ValueError("evaluation.reverse_kl_limit > 0 needs the teacher model")
            indices = range(min(spec.reverse_kl_limit, len(heldout)))
            metrics.update(
                sampled_reverse_kl(
                    model,
                    teacher,
                    [heldout.sequence(i)[: heldout.prompt_lens[i]].tolist() for i in indices],
                    eos_token_id=int(tokenizer.eos_token_id),
                    pad_token_id=int(tokenizer.pad_token_id),
                    max_new_tokens=spec.reverse_kl_max_new_tokens,
                    batch_size=spec.batch_size,
                )
            )
        for name in spec.question_sets:
            questions = load_question_set(name, limit=spec.question_limit)
            metrics.update(
                score_question_set(model, tokenizer, questions, spec.answer_max_new_tokens, spec.batch_size)
            )
    finally:
        model.train(was_training)
    metrics["per_record"] = per_record
    return metrics
