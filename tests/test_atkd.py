"""ATKD: the decomposition against a from-scratch reference, the median split, and the fused path."""

from __future__ import annotations

import torch

from kd_lightning.losses import AdaptiveTeachingKD, ForwardKL
from kd_lightning.losses.chunked import chunked_terms
from kd_lightning.losses.functional import IGNORE_INDEX
from tests.helpers.batches import position_batch

N, V = 10, 13


def batch_and_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(1, N, V, generator=g) * 2
    target = torch.randint(0, V, (1, N), generator=g)
    target[0, 0] = IGNORE_INDEX
    return {"target_ids": target, "teacher_logits": teacher}, torch.randn(1, N, V, generator=g)


def reference_parts(student, teacher, gold):
    """TKD and DKD per position, written directly from the paper's definitions."""
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    pg, qg = p.gather(-1, gold[..., None])[..., 0], q.gather(-1, gold[..., None])[..., 0]
    tkd = pg * (pg / qg).log() + (1 - pg) * ((1 - pg) / (1 - qg)).log()
    keep = torch.ones_like(p).scatter_(-1, gold[..., None], 0.0)
    p_hat, q_hat = p * keep / (1 - pg)[..., None], q * keep / (1 - qg)[..., None]
    dkd = (p_hat * (p_hat.clamp_min(1e-30).log() - q_hat.clamp_min(1e-30).log())).sum(-1)
    return tkd, dkd, pg


def test_decomposition_matches_reference_and_recovers_the_kl():
    batch, student = batch_and_logits()
    gold = batch["target_ids"].clamp_min(0)
    tkd, dkd, pg = reference_parts(student, batch["teacher_logits"], gold)
    valid = batch["target_ids"] != IGNORE_INDEX
    # the plain KL decomposes as TKD + (1 - p_g) * DKD
    fkl = ForwardKL("teacher")(student, position_batch(batch))
    torch.testing.assert_close(fkl, (tkd + (1 - pg) * dkd)[valid].mean(), atol=1e-5, rtol=1e-5)
    all_hard = AdaptiveTeachingKD("teacher", easy_weight=0.0, hard_fraction=1.0)(
        student, position_batch(batch)
    )
    torch.testing.assert_close(all_hard, (tkd + dkd)[valid].mean(), atol=1e-5, rtol=1e-5)
    all_easy = AdaptiveTeachingKD("teacher", easy_weight=1.0, hard_fraction=0.0)(
        student, position_batch(batch)
    )
    torch.testing.assert_close(all_easy, dkd[valid].mean(), atol=1e-5, rtol=1e-5)


def test_median_split_weights_hard_and_easy_positions():
    batch, student = batch_and_logits(1)
    term = AdaptiveTeachingKD("teacher", easy_weight=0.2, hard_fraction=0.5)
    hard = term.hard_positions(position_batch(batch))
    valid = batch["target_ids"] != IGNORE_INDEX
    assert int(hard.sum()) == 5 and not (hard & ~valid).any()  # ceil(0.5 * 9)
    gold = batch["target_ids"].clamp_min(0)
    tkd, dkd, pg = reference_parts(student, batch["teacher_logits"], gold)
    uncertainty = 1 - pg
    assert uncertainty[hard].min() >= uncertainty[valid & ~hard].max()
    expected = torch.where(hard, 0.8 * (tkd + dkd), 0.2 * dkd)[valid].mean()
    torch.testing.assert_close(term(student, position_batch(batch)), expected, atol=1e-5, rtol=1e-5)


def test_gold_outside_a_sparse_target_is_the_tail_bucket_and_hard():
    batch, student = batch_and_logits(2)
    probs, ids = torch.softmax(batch["teacher_logits"], -1).topk(3, -1)
    gold = batch["target_ids"].clamp_min(0)
    sparse = {
        "target_ids": batch["target_ids"],
        "prior_ids": ids,
        "prior_probs": probs,
        "prior_tail": 1 - probs.sum(-1),
    }
    term = AdaptiveTeachingKD("prior")
    outside = ~(ids == gold[..., None]).any(-1) & (batch["target_ids"] != IGNORE_INDEX)
    assert outside.any()
    hard = term.hard_positions(position_batch(sparse))
    # an unstored gold token has probability 0: maximal uncertainty, so it is hard first
    if int(outside.sum()) <= 5:
        assert hard[outside].all()
    else:
        assert int(hard.sum()) == 5 and not (hard & ~outside).any()
    value = term(student, position_batch(sparse))
    assert torch.isfinite(value) and value > 0


def test_one_hot_teacher_is_finite_with_no_diversity_part():
    batch, student = batch_and_logits(3)
    gold = batch["target_ids"].clamp_min(0)
    one_hot = torch.full((1, N, V), float("-inf")).scatter_(-1, gold[..., None], 0.0)
    batch["teacher_logits"] = one_hot
    student.requires_grad_(True)
    easy_only = AdaptiveTeachingKD("teacher", easy_weight=1.0, hard_fraction=0.0)(
        student, position_batch(batch)
    )
    assert easy_only.item() == 0.0
    value = AdaptiveTeachingKD("teacher")(student, position_batch(batch))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_fused_path_uses_the_whole_batch_split():
    batch, _ = batch_and_logits(4)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, V, bias=False)
    hidden = torch.randn(N, 6, requires_grad=True)
    term = AdaptiveTeachingKD("teacher")
    plain = term(head(hidden).unsqueeze(0), position_batch(batch))
    chunked = chunked_terms(hidden, head, {"atkd": term}, position_batch(batch), chunk_size=3)["atkd"]
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)
