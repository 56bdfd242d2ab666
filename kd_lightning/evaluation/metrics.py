"""Evaluation metrics on generations and predictions (torchmetrics where it has the metric).

* :func:`rouge_l`: ROUGE-L F1 of generations against references (torchmetrics), as MiniLLM/DistiLLM report;
* :func:`exact_match`: normalised string equality, for short-answer question sets;
* :func:`answer_match`: the reply starts with the answer (OpenAI evals' ``Match``), for chatty models;
* :func:`multiple_choice_accuracy`: pick the choice with the highest log-likelihood;
* :func:`token_calibration_error`: expected calibration error of next-token predictions (top-1 confidence
  against top-1 correctness, torchmetrics' binary ECE with equal-width bins).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_calibration_error
from torchmetrics.functional.text.rouge import rouge_score

from kd_lightning.losses.functional import IGNORE_INDEX


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (0–1) of ``predictions`` against ``references`` (one reference each)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scores = rouge_score(list(predictions), list(references), rouge_keys="rougeL", accumulate="avg")
    return float(scores["rougeL_fmeasure"])


def rouge_l_each(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 (0–1) of each prediction against its reference (their mean is :func:`rouge_l`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return [
        float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"])
        for p, r in zip(predictions, references)
    ]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Share of predictions equal (after :func:`normalize_answer`) to their answer or one of their answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise ValueError("exact_match needs at least one prediction")
    hits = 0
    for prediction, answer in zip(predictions, answers):
        options = [answer] if isinstance(answer, str) else list(answer)
        hits += normalize_answer(prediction) in {normalize_answer(a) for a in options}
    return hits / len(predictions)


def answer_match(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Share of replies that start with their answer after :func:`normalize_answer` (OpenAI evals' ``Match``).

    "Yes, because ..." matches "Yes"; "Yesterday" does not (the match ends at a word boundary).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise ValueError("answer_match needs at least one prediction")
    hits = 0
    for prediction, answer in zip(predictions, answers):
        reply = normalize_answer(prediction).split()
        options = [answer] if isinstance(answer, str) else list(answer)
        hits += any(
            (words := normalize_answer(option).split()) and reply[: len(words)] == words for option in options
        )
    return hits / len(predictions)


def multiple_choice_accuracy(
    choice_log_likelihoods: Sequence[Sequence[float]], correct: Sequence[int]
) -> float:
    """Share of questions whose highest-likelihood choice is the correct one (ties go to the first)."""
    if len(choice_log_likelihoods) != len(correct):
        raise ValueError(f"{len(choice_log_likelihoods)} questions but {len(correct)} answers")
    if not correct:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    hits = 0
    for scores, answer in zip(choice_log_likelihoods, correct):
        if not 0 <= answer < len(scores):
            raise ValueError(f"answer index {answer} is out of range for {len(scores)} choices")
        hits += max(range(len(scores)), key=lambda i: (scores[i], -i)) == answer
    return hits / len(correct)


@torch.no_grad()
def token_calibration_error(logits: torch.Tensor, target_ids: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of the top-1 next-token prediction at target positions; logits (..., V), targets (...)."""
    mask = target_ids != IGNORE_INDEX
    if not mask.any():
        raise ValueError("token_calibration_error needs at least one target position")
    probs = torch.softmax(logits[mask].float(), dim=-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == target_ids[mask]).long()
    return float(binary_calibration_error(confidence, correct, n_bins=n_bins, norm="l1"))
