"""Evaluation metrics and estimate-fidelity measures against hand-computed cases and their limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning.data.soft_labels import SparseRows
from kd_lightning.evaluation.fidelity import (
    estimate_fidelity,
    label_smoothing_estimate,
    one_hot_estimate,
    sparse_estimate,
    summarize_fidelity,
)
from kd_lightning.evaluation.metrics import (
    exact_match,
    multiple_choice_accuracy,
    rouge_l,
    token_calibration_error,
)
from kd_lightning.losses.functional import IGNORE_INDEX


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = 5 of 6 tokens each → F1 = 5/6
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6, abs=1e-4)
    assert rouge_l(["a b c", "x y"], ["a b c", "p q"]) == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])


def test_exact_match_normalises_and_accepts_alternatives():
    assert exact_match(
        ["The Eiffel Tower!", "paris", "4"], ["eiffel tower", ["Paris", "Paris, France"], "5"]
    ) == (pytest.approx(2 / 3))


def test_multiple_choice_accuracy_by_log_likelihood():
    assert multiple_choice_accuracy([[-1.0, -0.5], [-2.0, -3.0], [-1.0, -1.0]], [1, 0, 1]) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="out of range"):
        multiple_choice_accuracy([[-1.0, -2.0]], [2])


def test_token_calibration_error_by_hand():
    # two positions: confident and right (0.9 → correct), unsure and wrong
    logits = torch.log(torch.tensor([[[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]]]))
    targets = torch.tensor([[0, 1]])
    # bins of width 1/15: |0.9 - 1|·1/2 + |0.6 - 0|·1/2 = 0.35
    assert token_calibration_error(logits, targets) == pytest.approx(0.35, abs=1e-5)
    masked = torch.tensor([[0, IGNORE_INDEX]])
    assert token_calibration_error(logits, masked) == pytest.approx(0.1, abs=1e-5)


def true_distributions(n=6, v=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g) * 2, -1)


def test_fidelity_is_zero_when_the_estimate_is_the_truth():
    p = true_distributions()
    got = summarize_fidelity(estimate_fidelity(p, lambda rows: p[rows], top_k=3, chunk_rows=4))
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["tv"] == pytest.approx(0.0, abs=1e-7)
    assert got["topk_recall"] == 1.0


def test_fidelity_by_hand_and_baselines():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    observed = torch.tensor([0])
    hot = estimate_fidelity(p, one_hot_estimate(observed, 4), top_k=2, floor=1e-8)
    assert hot["tv"].item() == pytest.approx(0.5)  # ½(|0.5−1| + 0.3 + 0.2)
    floored = lambda e: (e + 1e-8) / (1 + 4e-8)  # noqa: E731
    expected_kl = (
        0.5 * math.log(0.5 / floored(1.0))
        + 0.3 * math.log(0.3 / floored(0.0))
        + 0.2 * math.log(0.2 / floored(0.0))
    )
    assert hot["kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    smooth = estimate_fidelity(p, label_smoothing_estimate(observed, 4, smoothing=0.4), top_k=2)
    # estimate = [0.7, 0.1, 0.1, 0.1] → TV = ½(0.2 + 0.2 + 0.1 + 0.1) = 0.3; far lower KL than one-hot
    assert smooth["tv"].item() == pytest.approx(0.3, abs=1e-6)
    assert smooth["kl"].item() < hot["kl"].item() / 10


def test_sparse_estimate_spreads_the_tail_over_unstored_ids():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    rows = SparseRows(
        np.array([[0, 1]], dtype=np.uint16),
        np.array([[0.5, 0.3]], dtype=np.float16),
        np.array([0.2], np.float32),
    )
    got = estimate_fidelity(p, sparse_estimate(rows, 4), top_k=2)
    assert got["tv"].item() == pytest.approx(0.0, abs=1e-3) and got["topk_recall"].item() == 1.0
    with pytest.raises(ValueError, match="top_k"):
        estimate_fidelity(p, sparse_estimate(rows, 4), top_k=5)
