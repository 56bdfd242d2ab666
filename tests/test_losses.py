"""Exact maths of the sparse KL and hard CE (the generic properties are in test_loss_properties.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import ForwardKL, HardCrossEntropy, SoftLabelKL, masked_mean, sparse_target_kl
from kd_lightning.losses.functional import IGNORE_INDEX
from tests.helpers.batches import position_batch

B, T, V, K = 2, 5, 13, 4


def make_batch(seed: int = 0, k: int = K, full_vocab: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :2] = IGNORE_INDEX  # prompt positions
    teacher = torch.softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    kk = V if full_vocab else k
    probs, ids = teacher.topk(kk, dim=-1)
    tail = (1 - probs.sum(-1)).clamp_min(0)
    return {
        "target_ids": target,
        "teacher": teacher,
        "prior_ids": ids,
        "prior_probs": probs,
        "prior_tail": tail,
        "input_ids": target.clamp_min(0),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
    }


def test_sparse_kl_zero_when_student_equals_target():
    batch = make_batch(full_vocab=True)
    logits = batch["teacher"].log()
    value = sparse_target_kl(logits, batch["prior_ids"], batch["prior_probs"], batch["prior_tail"])
    assert value.abs() < 1e-5


def test_sparse_kl_with_full_vocab_equals_dense_kl():
    batch = make_batch(full_vocab=True)
    logits = torch.randn(B, T, V)
    mask = batch["target_ids"] != IGNORE_INDEX
    ours = sparse_target_kl(logits, batch["prior_ids"], batch["prior_probs"], batch["prior_tail"], mask)
    per_pos = F.kl_div(torch.log_softmax(logits, -1), batch["teacher"], reduction="none").sum(-1)
    torch.testing.assert_close(ours, masked_mean(per_pos, mask), atol=1e-5, rtol=1e-5)


def test_sparse_kl_equals_kl_of_coarsened_distributions():
    batch = make_batch(k=3)
    logits = torch.randn(B, T, V)
    ours = sparse_target_kl(logits, batch["prior_ids"], batch["prior_probs"], batch["prior_tail"])
    q = torch.softmax(logits, -1)
    q_k = q.gather(-1, batch["prior_ids"])
    p = torch.cat([batch["prior_probs"], batch["prior_tail"].unsqueeze(-1)], -1)
    qc = torch.cat([q_k, (1 - q_k.sum(-1)).unsqueeze(-1)], -1)
    expected = (p * (p.log() - qc.log())).sum(-1).mean()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_temperature_scales_by_t_squared_on_one_hot_free_case():
    batch = make_batch(full_vocab=True)
    logits = torch.randn(B, T, V)
    t = 2.0
    ours = sparse_target_kl(
        logits, batch["prior_ids"], batch["prior_probs"], batch["prior_tail"], distill_temperature=t
    )
    p_t = torch.softmax(batch["teacher"].log() / t, -1)
    per_pos = F.kl_div(torch.log_softmax(logits / t, -1), p_t, reduction="none").sum(-1) * t * t
    torch.testing.assert_close(ours, per_pos.mean(), atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_split_invariance():
    """Token-weighted sums over two half-batches equal the full batch (what accumulation relies on)."""
    batch = make_batch()
    logits = torch.randn(B, T, V)
    mask = batch["target_ids"] != IGNORE_INDEX
    full = (
        sparse_target_kl(logits, batch["prior_ids"], batch["prior_probs"], batch["prior_tail"], mask)
        * mask.sum()
    )
    parts = sum(
        sparse_target_kl(
            logits[i : i + 1],
            batch["prior_ids"][i : i + 1],
            batch["prior_probs"][i : i + 1],
            batch["prior_tail"][i : i + 1],
            mask[i : i + 1],
        )
        * mask[i : i + 1].sum()
        for i in range(B)
    )
    torch.testing.assert_close(full, parts)


def test_invalid_settings():
    with pytest.raises(ValueError, match="weight"):
        HardCrossEntropy(weight=-1)
    with pytest.raises(ValueError, match="distill_temperature"):
        ForwardKL("prior", distill_temperature=0)
    with pytest.raises(KeyError, match="posterior"):
        ForwardKL("posterior")(torch.randn(B, T, V), position_batch(make_batch()))


def test_soft_label_kl_of_earlier_releases_is_forward_kl_with_one_warning():
    batch, logits = position_batch(make_batch()), torch.randn(B, T, V)
    with pytest.warns(
        FutureWarning, match=r"SoftLabelKL\(soft_labels='prior'\) is ForwardKL\(kd_target='prior'\)"
    ):
        old = SoftLabelKL(soft_labels="prior", distill_temperature=2.0)
    new = ForwardKL(kd_target="prior", distill_temperature=2.0)
    assert old.soft_labels == new.soft_labels == ("prior",) and old.fused_kind() == new.fused_kind()
    torch.testing.assert_close(old(logits, batch), new(logits, batch))
