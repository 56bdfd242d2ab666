"""Properties every loss term gets for free: parametrised over every file in ``conf/loss/``.

A new loss is one class plus one YAML; these tests pick it up without being edited. Terms over logits are
checked against three target forms: a dense teacher (``teacher_logits``), a sparse store holding the whole
vocabulary (``prior``, k = V), and a sparse store with k < V and a non-empty tail bucket (``prior_tail``),
the form every real store has; and through ``DistillModule``, where the fused sparse pass and the chunked
path apply to the terms that declare them.
Terms over hidden states (``reads_logits = False``) get their own properties in ``test_feature_losses``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data.batch import PositionBatch
from kd_lightning.losses import (
    AdaptiveKL,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.losses.terms import AGREEMENT_STORE, DivergenceTerm
from kd_lightning.losses.weighting import STORES_READ
from tests.helpers.batches import position_batch
from tests.helpers.losses import (
    CASES,
    DIVERGENCE_FILES,
    FORMS,
    B,
    T,
    V,
    configured_term,
)


def with_target(term, target: str):
    term = copy.deepcopy(term)
    if isinstance(term, DivergenceTerm):
        term.kd_target = target
        own = () if target == "teacher" else (target,)
        term.soft_labels = tuple(dict.fromkeys((*own, *STORES_READ[term.weighting])))
    return term


def make_batch(
    seed: int = 0, teacher_logits: torch.Tensor | None = None, k: int = V
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :2] = IGNORE_INDEX
    teacher = torch.randn(B, T, V, generator=g) * 2 if teacher_logits is None else teacher_logits
    probs, ids = torch.softmax(teacher, -1).topk(k, dim=-1)
    batch = {"target_ids": target, "teacher_logits": teacher}
    for name in ("prior", "posterior"):
        batch[f"{name}_ids"], batch[f"{name}_probs"] = ids, probs
        batch[f"{name}_tail"] = (1 - probs.sum(-1)).clamp_min(0) if k < V else torch.zeros(B, T)
    # the proxy's probability of each observed token, one entry per position (weighting=proxy_agreement)
    agreement = torch.rand(B, T, 1, generator=g)
    batch[f"{AGREEMENT_STORE}_ids"] = target.clamp_min(0).unsqueeze(-1)
    batch[f"{AGREEMENT_STORE}_probs"] = agreement
    batch[f"{AGREEMENT_STORE}_tail"] = 1 - agreement[..., 0]
    # the count of the context the prior used at each position (weighting=prior_reliability)
    batch["prior_context_count"] = torch.randint(0, 40, (B, T), generator=g).float()
    return batch


def case_id(case: tuple[str, str, str]) -> str:
    name, form, weighting = case
    return f"{name}-{form}" + ("" if weighting == "none" else f"-{weighting}")


@pytest.fixture(params=CASES, ids=case_id)
def case(request, kdl_env):
    """(term aimed at the form's target, k ids stored per position)."""
    name, form, weighting = request.param
    target, k = FORMS[form]
    return with_target(configured_term(name, weighting), target), k


def test_never_negative_finite_with_finite_grads(case):
    term, k = case
    logits = torch.randn(B, T, V, requires_grad=True)
    value = term(logits, position_batch(make_batch(k=k)))
    assert torch.isfinite(value) and value >= -1e-6
    value.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", DIVERGENCE_FILES)
def test_divergence_is_zero_when_student_equals_target(name, form, kdl_env):
    """With a tail, the student's buckets (stored ids + everything else) equal the target's: zero too.

    A stored tail is tempered as if spread evenly over the ids outside (``sparse_log_probs``), so the tail
    case uses a teacher whose unstored ids share one logit, where that is exact at any temperature.
    """
    target, k = FORMS[form]
    term = with_target(configured_term(name), target)
    batch = make_batch(k=k)
    if k < V:
        top, ids = batch["teacher_logits"].topk(k, dim=-1)
        flat = torch.full_like(batch["teacher_logits"], float(top.min()) - 1.0).scatter(-1, ids, top)
        batch = make_batch(teacher_logits=flat, k=k)
    assert term(batch["teacher_logits"].clone(), position_batch(batch)).abs() < 1e-5


def test_masked_positions_have_no_effect(case):
    term, k = case
    batch = make_batch(k=k)
    logits = torch.randn(B, T, V)
    changed = logits.clone()
    changed[0, :2] = torch.randn(2, V) * 30
    torch.testing.assert_close(term(logits, position_batch(batch)), term(changed, position_batch(batch)))


def test_all_masked_is_finite_zero_with_finite_grads(case):
    term, k = case
    batch = make_batch(k=k)
    batch["target_ids"][:] = IGNORE_INDEX
    logits = torch.randn(B, T, V, requires_grad=True)
    value = term(logits, position_batch(batch))
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_no_gradient_reaches_the_teacher(case):
    term, k = case
    batch = make_batch(k=k)
    batch["teacher_logits"].requires_grad_(True)
    batch["prior_probs"].requires_grad_(True)
    logits = torch.randn(B, T, V, requires_grad=True)
    term(logits, position_batch(batch)).backward()
    assert batch["teacher_logits"].grad is None and batch["prior_probs"].grad is None


def test_padding_invariance(case):
    term, k = case
    batch = make_batch(k=k)
    logits = torch.randn(B, T, V)
    pad = 3

    def padded(x):
        return torch.cat([x, torch.zeros((B, pad, *x.shape[2:]), dtype=x.dtype)], 1)

    big = {k: padded(v) for k, v in batch.items()}
    big["target_ids"][:, T:] = IGNORE_INDEX
    torch.testing.assert_close(
        term(logits, position_batch(batch)),
        term(torch.cat([logits, torch.randn(B, pad, V)], 1), position_batch(big)),
    )


def test_gradient_accumulation_split_invariance(case):
    """Token-weighted sums over per-sequence micro-batches equal the whole batch."""
    term, k = case
    if term.uses_batch_statistics:
        pytest.skip("a batch-level statistic (e.g. ATKD's median split) depends on the batch, by design")
    batch = make_batch(k=k)
    logits = torch.randn(B, T, V)
    counts = (batch["target_ids"] != IGNORE_INDEX).sum(1)
    whole = term(logits, position_batch(batch)) * counts.sum()
    parts = sum(
        term(logits[i : i + 1], position_batch({k: v[i : i + 1] for k, v in batch.items()})) * counts[i]
        for i in range(B)
    )
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)


def test_finite_with_minus_inf_logits_on_masked_vocabulary(case):
    term, k = case
    batch = make_batch(k=k)
    batch["teacher_logits"][..., -2:] = float("-inf")
    batch = make_batch(teacher_logits=batch["teacher_logits"], k=k)  # sparse targets from the masked teacher
    batch["target_ids"] = batch["target_ids"].clamp(max=V - 3)
    logits = torch.randn(B, T, V)
    logits[..., -2:] = float("-inf")
    logits.requires_grad_(True)
    value = term(logits, position_batch(batch))
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits_are_upcast(case):
    term, k = case
    batch = make_batch(k=k)
    logits = torch.randn(B, T, V).bfloat16()
    torch.testing.assert_close(
        term(logits, position_batch(batch)), term(logits.float(), position_batch(batch))
    )


def test_sparse_with_the_full_vocabulary_equals_dense(kdl_env):
    batch = make_batch(k=V)
    logits = torch.randn(B, T, V)
    for name in DIVERGENCE_FILES:
        term = configured_term(name)
        dense, sparse = with_target(term, "teacher"), with_target(term, "prior")
        torch.testing.assert_close(
            dense(logits, position_batch(batch)),
            sparse(logits, position_batch(batch)),
            atol=1e-5,
            rtol=1e-4,
            msg=name,
        )


# ------------------------------------------------------------------ functional API against references


def reference(student, teacher, kind, **kw):
    q, p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731 - KL(a || b) from log-probs
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":  # TRL GKDTrainer.generalized_jsd_loss's definition
        beta = kw["beta"]
        m = torch.logsumexp(
            torch.stack([q + torch.log(torch.tensor(1 - beta)), p + torch.log(torch.tensor(beta))]), 0
        )
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "sfkl":
        a = kw["alpha"]
        return kl(p, torch.log(a * p.exp() + (1 - a) * q.exp()))
    if kind == "srkl":
        a = kw["alpha"]
        return kl(q, torch.log(a * q.exp() + (1 - a) * p.exp()))
    if kind == "tvd":
        return 0.5 * (p.exp() - q.exp()).abs().sum(-1)
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("fn", "kind", "kw"),
    [
        (forward_kl, "fkl", {}),
        (reverse_kl, "rkl", {}),
        (generalized_jsd, "jsd", {"beta": 0.3}),
        (skew_forward_kl, "sfkl", {"alpha": 0.2}),
        (skew_reverse_kl, "srkl", {"alpha": 0.2}),
        (total_variation, "tvd", {}),
    ],
)
def test_functional_matches_reference_with_mask(fn, kind, kw):
    batch = make_batch()
    student = torch.randn(B, T, V)
    mask = batch["target_ids"] != IGNORE_INDEX
    ours = fn(student, batch["teacher_logits"], mask, **kw)
    expected = reference(student, batch["teacher_logits"], kind, **kw)[mask].mean()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_forward_kl_equals_torch_kl_div_and_hinton_scaling():
    batch = make_batch()
    s, t = torch.randn(B, T, V), batch["teacher_logits"]
    expected = (
        F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="none", log_target=True)
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(forward_kl(s, t), expected)
    temp = 3.0
    hinton = (
        F.kl_div(torch.log_softmax(s / temp, -1), torch.softmax(t / temp, -1), reduction="batchmean")
        / T
        * temp**2
    )
    torch.testing.assert_close(forward_kl(s, t, distill_temperature=temp), hinton, atol=1e-5, rtol=1e-5)


def test_endpoints_of_jsd_and_skew_are_the_kls():
    batch = make_batch()
    s = torch.randn(B, T, V)
    for form in ("teacher", "prior"):
        fkl, rkl = ForwardKL(form)(s, position_batch(batch)), ReverseKL(form)(s, position_batch(batch))
        torch.testing.assert_close(GeneralizedJSD(form, beta=0.0)(s, position_batch(batch)), fkl)
        torch.testing.assert_close(GeneralizedJSD(form, beta=1.0)(s, position_batch(batch)), rkl)
        torch.testing.assert_close(SkewForwardKL(form, alpha=0.0)(s, position_batch(batch)), fkl)
        torch.testing.assert_close(SkewReverseKL(form, alpha=0.0)(s, position_batch(batch)), rkl)


def akl_reference(student_logits, teacher_logits, head_mass=0.5, weights="paper") -> float:
    """AKL from its definition (Wu et al. 2024), in float64, one position at a time, with none of the code
    under test: the head is the fewest most likely teacher tokens whose mass reaches ``head_mass``; with
    gaps g = Σ|p − q| over head and tail, AKL = g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL.
    ``weights`` = "swapped" or "half" gives the two wrong formulas the test must tell apart."""
    s = student_logits.double().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.double().reshape(-1, teacher_logits.shape[-1])
    values = []
    for row_s, row_t in zip(s, t):
        q = [float(x) for x in torch.softmax(row_s, 0)]
        p = [float(x) for x in torch.softmax(row_t, 0)]
        order = sorted(range(len(p)), key=lambda i: -p[i])
        head, mass = set(), 0.0
        for i in order:
            if mass >= head_mass:
                break
            head.add(i)
            mass += p[i]
        g_head = sum(abs(p[i] - q[i]) for i in head)
        g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
        fkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        w_head = {"paper": g_head, "swapped": g_tail, "half": 0.5 * (g_head + g_tail)}[weights] / (
            g_head + g_tail
        )
        values.append(w_head * fkl + (1 - w_head) * rkl)
    return sum(values) / len(values)


def test_adaptive_kl_equals_its_definition_and_not_the_wrong_weightings():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(B, T, V, generator=g) * 3  # peaked: head and tail gaps differ
    student = torch.randn(B, T, V, generator=g)
    ours = adaptive_kl(student, teacher).item()
    assert ours == pytest.approx(akl_reference(student, teacher), rel=1e-5)
    for wrong in ("swapped", "half"):  # the test has the power to catch either mistake
        assert abs(akl_reference(student, teacher, weights=wrong) - ours) > 1e-2 * ours, wrong
    term = AdaptiveKL("teacher", head_mass=0.3)
    batch = PositionBatch(
        torch.zeros(1, B * T, dtype=torch.long), dense_logits={"teacher": teacher.reshape(1, B * T, V)}
    )
    assert term(student.reshape(1, B * T, V), position_batch(batch)).item() == pytest.approx(
        akl_reference(student, teacher, head_mass=0.3), rel=1e-5
    )


@pytest.mark.parametrize("cls", [GeneralizedJSD, SkewForwardKL, SkewReverseKL, AdaptiveKL])
def test_out_of_range_settings_are_clear_errors(cls):
    key = {"GeneralizedJSD": "beta", "AdaptiveKL": "head_mass"}.get(cls.__name__, "alpha")
    with pytest.raises(ValueError, match=key):
        cls("teacher", **{key: 1.5})


def packed_batch(k: int, n: int) -> dict[str, torch.Tensor]:
    """The first n positions of a batch, packed to (1, n, ...) as DistillModule hands them to the terms."""
    return {key: v.reshape(1, B * T, *v.shape[2:])[:, :n] for key, v in make_batch(k=k).items()}


@pytest.mark.parametrize(("name", "form", "weighting"), CASES, ids=map(case_id, CASES))
def test_chunked_fused_path_equals_plain_in_value_and_gradient(name, form, weighting, kdl_env):
    """The chunked path (with the fused sparse pass inside each chunk, beside hard CE) equals the plain one."""
    from kd_lightning.losses import HardCrossEntropy
    from kd_lightning.losses.chunked import chunked_terms

    target, k = FORMS[form]
    terms = {name: with_target(configured_term(name, weighting), target), "ce": HardCrossEntropy()}
    hidden_size, n = 8, 11
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, V, bias=False)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    batch = packed_batch(k, n)
    plain = {key: term(head(hidden).unsqueeze(0), position_batch(batch)) for key, term in terms.items()}
    g_hidden, g_head = torch.autograd.grad(sum(plain.values()), [hidden, head.weight])
    chunked = chunked_terms(hidden, head, terms, position_batch(batch), chunk_size=4, fuse=True)
    c_hidden, c_head = torch.autograd.grad(sum(chunked.values()), [hidden, head.weight])
    for key in terms:
        torch.testing.assert_close(chunked[key], plain[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(c_hidden, g_hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c_head, g_head, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "form", "weighting"), CASES, ids=map(case_id, CASES))
def test_distill_module_equals_the_term_called_directly(name, form, weighting, kdl_env):
    """Through DistillModule (fused sparse pass on, beside hard CE): each term's value and the total's
    gradient are what the terms give when called one by one; the fused pass runs only where declared."""
    from kd_lightning.losses import HardCrossEntropy
    from kd_lightning.losses.fused_sparse import fusable
    from kd_lightning.modules.distill import DistillModule

    target, k = FORMS[form]
    terms = {"ce_beside": HardCrossEntropy(), name: with_target(configured_term(name, weighting), target)}
    module = DistillModule(
        torch.nn.Linear(2, V), terms, optimizer=lambda params: torch.optim.SGD(params, lr=0.1)
    )
    batch = packed_batch(k, B * T)
    logits = torch.randn(1, B * T, V, requires_grad=True)
    through = module.compute_terms(logits, position_batch(batch))
    direct = {key: term(logits, position_batch(batch)) for key, term in terms.items()}
    fused = module.fused_values(logits, position_batch(batch))
    assert set(fused) == ({"ce_beside", name} if fusable(terms[name], position_batch(batch), V) else set())
    for key in terms:
        torch.testing.assert_close(through[key][1], direct[key], atol=1e-5, rtol=1e-5, msg=key)
    (g_through,) = torch.autograd.grad(sum(w * v for w, v in through.values()), logits)
    (g_direct,) = torch.autograd.grad(sum(terms[key].weight * v for key, v in direct.items()), logits)
    torch.testing.assert_close(g_through, g_direct, atol=1e-5, rtol=1e-4)


def test_dense_probabilities_equal_dense_logits(kdl_env):
    batch = make_batch()
    logits = torch.randn(B, T, V)
    as_probs = {
        "target_ids": batch["target_ids"],
        "teacher_probs": torch.softmax(batch["teacher_logits"], -1),
    }
    for name in DIVERGENCE_FILES:
        term = with_target(configured_term(name), "teacher")
        torch.testing.assert_close(
            term(logits, position_batch(batch)),
            term(logits, position_batch(as_probs)),
            atol=1e-5,
            rtol=1e-4,
            msg=name,
        )
