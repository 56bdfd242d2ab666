"""Decoupled soft-label terms against their definition, in float64: the KL's identity
``KL(p‖q) = KL(b_p‖b_q) + (1 − p_obs)·KL(p̂‖q̂)``, the decoupled value from a reference written from the
definition, no gradient on the observed logit at α = 0, and the sparse form (stored others + tail + observed)
against the dense one when every id is stored."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.data.batch import PositionBatch, SoftLabels
from kd_lightning.losses import ForwardKL, ReverseKL, decoupled_kl
from kd_lightning.losses.decoupled import decoupled_parts
from kd_lightning.losses.divergences import forward_kl_buckets

B, T, V = 2, 5, 11


def logits_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    observed = torch.randint(0, V, (B, T), generator=g)
    return student, teacher, observed


def reference(
    student: torch.Tensor, teacher: torch.Tensor, observed: torch.Tensor, alpha: float, beta: float
):
    """α·KL(b_t‖b_s) + β·KL(p̂_t‖p̂_s) per position, from the definition, one position at a time."""
    out = torch.zeros(observed.shape, dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in observed.shape)):
        i = tuple(index.tolist())
        p, q, g = torch.softmax(teacher[i], -1), torch.softmax(student[i], -1), int(observed[i])
        binary = p[g] * math.log(p[g] / q[g]) + (1 - p[g]) * math.log((1 - p[g]) / (1 - q[g]))
        others = [j for j in range(V) if j != g]
        p_hat, q_hat = p[others] / (1 - p[g]), q[others] / (1 - q[g])
        rest = float((p_hat * (p_hat / q_hat).log()).sum())
        out[i] = alpha * binary + beta * rest
    return out


def test_the_kl_is_its_target_part_plus_the_weighted_nontarget_part_in_float64():
    student, teacher, observed = logits_pair()
    log_p, log_q = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)  # float64 throughout
    target, nontarget, p_obs = decoupled_parts(log_p, log_q, observed)
    kl = forward_kl_buckets(log_p, log_q)
    torch.testing.assert_close(target + (1 - p_obs) * nontarget, kl, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(
        target, reference(student, teacher, observed, 1.0, 0.0), atol=1e-12, rtol=1e-10
    )
    torch.testing.assert_close(
        nontarget, reference(student, teacher, observed, 0.0, 1.0), atol=1e-12, rtol=1e-10
    )


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.0, 1.0), (0.3, 2.0)])
def test_decoupled_kl_equals_its_definition(alpha, beta):
    student, teacher, observed = logits_pair(1)
    observed[0, :2] = -100  # not targets
    ours = decoupled_kl(student, teacher, observed, target_weight=alpha, nontarget_weight=beta)
    expected = reference(student, teacher, observed.clamp_min(0), alpha, beta)[observed >= 0].mean()
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)  # the divergences compute in float32


def test_without_its_target_part_no_gradient_reaches_the_observed_logit():
    student, teacher, observed = logits_pair(2)
    student = student.float().requires_grad_(True)
    decoupled_kl(student, teacher.float(), observed, target_weight=0.0, nontarget_weight=1.0).backward()
    on_observed = student.grad.gather(-1, observed.unsqueeze(-1))
    assert float(on_observed.abs().max()) == 0.0
    assert float(student.grad.abs().max()) > 1e-4  # the other logits do get one


def sparse_batch(
    teacher: torch.Tensor, observed: torch.Tensor, k: int, drop_observed: bool = False
) -> PositionBatch:
    probs, ids = torch.softmax(teacher.float(), -1).topk(k, dim=-1)
    if drop_observed:  # the observed token is not among the stored ids: its mass goes to the tail
        keep = ids != observed.unsqueeze(-1)
        probs = probs * keep
    tail = (1 - probs.sum(-1)).clamp_min(0)
    return PositionBatch(
        observed.reshape(1, -1),
        {"prior": SoftLabels(ids.reshape(1, -1, k), probs.reshape(1, -1, k), tail.reshape(1, -1))},
    )


@pytest.mark.parametrize("cls", [ForwardKL, ReverseKL])
def test_a_sparse_store_with_every_id_equals_the_dense_target(cls):
    student, teacher, observed = logits_pair(3)
    dense = PositionBatch(
        observed.reshape(1, -1), dense_logits={"teacher": teacher.float().reshape(1, -1, V)}
    )
    logits = student.float().reshape(1, -1, V)
    settings = {"decoupled": True, "target_weight": 0.4, "nontarget_weight": 1.5}
    torch.testing.assert_close(
        cls("prior", **settings)(logits, sparse_batch(teacher, observed, V)),
        cls("teacher", **settings)(logits, dense),
        atol=1e-5,
        rtol=1e-5,
    )


def test_a_sparse_row_without_the_observed_token_gives_it_no_target_mass():
    """The observed token's bucket then holds 0 target probability and the student's own, carved out of its
    tail: the target part pushes the student's probability of it down, the rest ranks the stored ids."""
    student, teacher, observed = logits_pair(4)
    batch = sparse_batch(teacher, observed, 4, drop_observed=True)
    logits = student.float().reshape(1, -1, V).requires_grad_(True)
    ForwardKL("prior", decoupled=True, target_weight=1.0, nontarget_weight=0.0)(logits, batch).backward()
    on_observed = logits.grad.gather(-1, observed.reshape(1, -1, 1))
    assert bool((on_observed > 0).all())  # raising the observed logit raises the loss: target says 0


def test_decoupled_settings_are_checked_and_the_fused_path_is_not_taken():
    with pytest.raises(ValueError, match="target_weight and nontarget_weight must be >= 0"):
        ForwardKL("prior", decoupled=True, target_weight=-1.0)
    assert ForwardKL("prior").fused_kind() == "forward_kl"
    assert ForwardKL("prior", decoupled=True).fused_kind() is None
    from kd_lightning.losses import AdaptiveTeachingKD

    with pytest.raises(TypeError):  # ATKD decouples in its own way: no such setting
        AdaptiveTeachingKD("prior", decoupled=True)
