"""Sparse targets built from teacher logits: top-k matches dense with full k; sampled is unbiased."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import ForwardKL, forward_kl
from kd_lightning.losses.sparsify import sampled_rows, topk_rows
from tests.helpers.batches import position_batch

B, T, V = 2, 3, 11


def batch_from(ids, probs, tail, target_ids):
    return {"target_ids": target_ids, "prior_ids": ids, "prior_probs": probs, "prior_tail": tail}


def test_topk_with_full_vocabulary_equals_dense():
    teacher, student = torch.randn(B, T, V), torch.randn(B, T, V)
    batch = batch_from(*topk_rows(teacher, V), torch.zeros(B, T, dtype=torch.long))
    torch.testing.assert_close(
        ForwardKL("prior")(student, position_batch(batch)), forward_kl(student, teacher), atol=1e-5, rtol=1e-5
    )


def test_sampled_probabilities_merge_repeats_and_sum_to_one():
    teacher = torch.randn(B, T, V) * 3
    ids, probs, tail = sampled_rows(teacher, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, T))
    assert (tail == 0).all()
    for row_ids, row_p in zip(ids.reshape(-1, 16), probs.reshape(-1, 16)):
        kept = row_ids[row_p > 0]
        assert len(kept) == len(set(kept.tolist()))  # each id carries its mass once


def test_sampled_rows_give_an_unbiased_forward_kl_gradient():
    torch.manual_seed(0)
    teacher = torch.randn(B, T, V) * 2
    student = torch.randn(B, T, V, requires_grad=True)
    targets = torch.zeros(B, T, dtype=torch.long)
    (dense_grad,) = torch.autograd.grad(forward_kl(student, teacher), student)
    g = torch.Generator().manual_seed(1)
    mean_grad = torch.zeros_like(student)
    draws = 3000
    for _ in range(draws):
        batch = batch_from(*sampled_rows(teacher, 4, g), targets)
        (grad,) = torch.autograd.grad(ForwardKL("prior")(student, position_batch(batch)), student)
        mean_grad += grad / draws
    assert (mean_grad - dense_grad).abs().max() < 4e-3
    # a single draw of 4 samples is far from dense: the agreement above is the average, not luck
    assert (grad - dense_grad).abs().max() > 1e-2


def test_sampled_rows_reject_k_below_one():
    with pytest.raises(ValueError, match="k must be"):
        sampled_rows(torch.randn(2, V), 0)
