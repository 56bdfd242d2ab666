"""The one-pass hard CE + sparse forward KLs equal the separate terms in value and gradient."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import ForwardKL, GeneralizedJSD, HardCrossEntropy
from kd_lightning.losses.chunked import chunked_terms
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_terms
from tests.helpers.batches import position_batch

N, V, K = 14, 40, 6


def make_batch(seed=0, k=K):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V - 2, (1, N), generator=g)  # gold tokens outside the masked slice
    target[0, :3] = IGNORE_INDEX
    batch = {"target_ids": target}
    for name in ("prior", "posterior"):
        probs = torch.rand(1, N, k, generator=g)
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).unsqueeze(0)
        probs[0, 4, 1] = 0.0  # an absent (padding) entry
        batch[f"{name}_ids"] = ids
        batch[f"{name}_probs"] = probs / probs.sum(-1, keepdim=True) * 0.85
        batch[f"{name}_tail"] = torch.full((1, N), 0.15)
    batch["prior_tail"][0, 5] = 0.0  # a row with no tail
    return batch


COMBOS = {
    "ce+prior": {"ce": HardCrossEntropy(), "prior": ForwardKL("prior", weight=0.5)},
    "ce+prior+posterior": {
        "ce": HardCrossEntropy(weight=1.0),
        "prior": ForwardKL("prior", weight=0.7),
        "post": ForwardKL("posterior", weight=0.3),
    },
    "prior+posterior": {"prior": ForwardKL("prior"), "post": ForwardKL("posterior")},
}


def total(values, terms):
    return sum(terms[n].weight * v for n, v in values.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_values_and_gradients_equal_the_separate_terms(combo, dtype):
    terms, batch = COMBOS[combo], make_batch()
    logits = (torch.randn(1, N, V) * 3).to(dtype)
    logits[0, 2:, -2:] = float("-inf")  # a masked vocabulary slice
    logits.requires_grad_(True)
    plain = {n: t(logits, position_batch(batch)) for n, t in terms.items()}
    fused = fused_sparse_terms(logits, terms, position_batch(batch))
    for n in terms:
        torch.testing.assert_close(fused[n], plain[n], atol=1e-5, rtol=1e-5, msg=n)
    (g_plain,) = torch.autograd.grad(total(plain, terms), logits)
    (g_fused,) = torch.autograd.grad(total(fused, terms), logits)
    assert g_fused.dtype == dtype and torch.isfinite(g_fused).all()
    # in bf16 the separate terms' gradients are each rounded before autograd sums them; the fused one once
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 1e-2}
    torch.testing.assert_close(g_fused.float(), g_plain.float(), **tol)


def test_all_masked_is_finite_zero():
    terms, batch = COMBOS["ce+prior+posterior"], make_batch()
    batch["target_ids"][:] = IGNORE_INDEX
    logits = torch.randn(1, N, V, requires_grad=True)
    fused = fused_sparse_terms(logits, terms, position_batch(batch))
    assert all(v.item() == 0.0 for v in fused.values())
    (grad,) = torch.autograd.grad(total(fused, terms), logits)
    assert (grad == 0).all()


def test_only_exact_forward_kls_at_unit_temperature_on_sparse_targets_fuse():
    batch = make_batch()
    assert fusable(HardCrossEntropy(), position_batch(batch), V)
    assert fusable(ForwardKL("prior"), position_batch(batch), V)
    assert not fusable(ForwardKL("prior", distill_temperature=2.0), position_batch(batch), V)
    assert not fusable(GeneralizedJSD("prior"), position_batch(batch), V)
    assert not fusable(
        ForwardKL("teacher"), position_batch({**batch, "teacher_logits": torch.randn(1, N, V)}), V
    )
    assert not fusable(
        ForwardKL("prior"), position_batch(make_batch(k=V)), V
    )  # every id stored: the plain path


def test_chunked_fused_equals_plain():
    terms, batch = COMBOS["ce+prior+posterior"], make_batch()
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(N, 8, requires_grad=True)
    plain = {n: t(head(hidden).unsqueeze(0), position_batch(batch)) for n, t in terms.items()}
    chunked = chunked_terms(hidden, head, terms, position_batch(batch), chunk_size=5, fuse=True)
    for n in terms:
        torch.testing.assert_close(chunked[n], plain[n], atol=1e-5, rtol=1e-5)
    g_plain = torch.autograd.grad(total(plain, terms), [hidden, head.weight])
    g_chunk = torch.autograd.grad(total(chunked, terms), [hidden, head.weight])
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("combine", ["weights", "other"])
def test_fused_linear_path_gradients_for_any_combination_of_the_values(bias, combine):
    """The fused linear path takes the gradients of the terms' weighted sum in forward; backward scales them
    for that sum (times any factor) and computes them afresh for any other combination: exact either way."""
    from kd_lightning.losses import chunked

    terms, batch = COMBOS["ce+prior+posterior"], make_batch(seed=3)
    torch.manual_seed(1)
    head = torch.nn.Linear(8, V, bias=bias)
    hidden = torch.randn(N, 8, requires_grad=True)
    params = [hidden, head.weight, *([head.bias] if bias else [])]
    coef = {
        n: (3.0 * t.weight if combine == "weights" else float(i + 1) ** 2)
        for i, (n, t) in enumerate(terms.items())
    }
    plain = {n: t(head(hidden).unsqueeze(0), position_batch(batch)) for n, t in terms.items()}
    g_plain = torch.autograd.grad(sum(coef[n] * v for n, v in plain.items()), params)
    calls = {"passes": 0}
    original = chunked._linear_sparse_pass

    def counted(*args, **kwargs):
        calls["passes"] += 1
        return original(*args, **kwargs)

    chunked._linear_sparse_pass = counted
    try:
        values = chunked_terms(hidden, head, terms, position_batch(batch), chunk_size=4, fuse=True)
        g_fused = torch.autograd.grad(sum(coef[n] * v for n, v in values.items()), params)
    finally:
        chunked._linear_sparse_pass = original
    assert calls["passes"] == (
        1 if combine == "weights" else 2
    )  # the fused path ran; recomputed only if needed
    for n in terms:
        torch.testing.assert_close(values[n], plain[n], atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
