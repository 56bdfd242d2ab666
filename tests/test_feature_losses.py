"""Hidden-state (feature) losses: properties for every such file in ``conf/loss/``, projection, module wiring."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning.data.batch import PositionBatch
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import (
    ForwardKL,
    HardCrossEntropy,
    HiddenStateLoss,
    hidden_cosine_distance,
    hidden_mse,
)
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.teacher import OnlineTeacherDistillModule
from tests.helpers.batches import position_batch
from tests.helpers.configs import compose_cfg
from tests.helpers.losses import FEATURE_FILES, configured_term
from tests.helpers.training import fit_one_batch

B, T, LAYERS = 2, 5, 3


def fake_model(width: int, layers: int = LAYERS):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=width, num_hidden_layers=layers))


def bound(name: str, student_width: int = 8, teacher_width: int = 8) -> HiddenStateLoss:
    term = copy.deepcopy(configured_term(name))
    term.setup(fake_model(student_width), fake_model(teacher_width))
    return term


def make_batch(term: HiddenStateLoss, student_width=8, teacher_width=8, seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 10, (B, T), generator=g)
    target[0, :2] = IGNORE_INDEX
    batch = {"target_ids": target}
    for t in term.teacher_layers:
        batch[f"teacher_hidden_{t}"] = torch.randn(B, T, teacher_width, generator=g)
    for s, t in term.pairs:
        batch[f"student_hidden_{s}"] = (
            batch[f"teacher_hidden_{t}"].clone() if same else torch.randn(B, T, student_width, generator=g)
        ).requires_grad_(True)
    return batch


@pytest.fixture(params=FEATURE_FILES)
def name(request, kdl_env):
    return request.param


def test_non_negative_finite_and_grads_reach_only_the_student(name):
    term = bound(name)
    batch = make_batch(term)
    for t in term.teacher_layers:
        batch[f"teacher_hidden_{t}"].requires_grad_(True)
    value = term(None, position_batch(batch))
    assert torch.isfinite(value) and value >= 0
    value.backward()
    s, t = term.pairs[0]
    assert torch.isfinite(batch[f"student_hidden_{s}"].grad).all()
    assert batch[f"teacher_hidden_{t}"].grad is None


def test_zero_when_student_equals_teacher(name):
    term = bound(name)
    assert term(None, position_batch(make_batch(term, same=True))).abs() < 1e-6


def test_masked_positions_have_no_effect(name):
    term = bound(name)
    batch = make_batch(term)
    changed = {k: v.detach().clone() for k, v in batch.items()}
    for s, _ in term.pairs:
        changed[f"student_hidden_{s}"][0, :2] = 1e3
    torch.testing.assert_close(term(None, position_batch(batch)), term(None, position_batch(changed)))


def test_all_masked_is_finite_zero(name):
    term = bound(name)
    batch = make_batch(term)
    batch["target_ids"][:] = IGNORE_INDEX
    value = term(None, position_batch(batch))
    assert value.item() == 0.0
    value.backward()
    s, _ = term.pairs[0]
    assert torch.isfinite(batch[f"student_hidden_{s}"].grad).all()


def test_micro_batch_split_invariance(name):
    term = bound(name)
    batch = {k: v.detach() for k, v in make_batch(term).items()}
    counts = (batch["target_ids"] != IGNORE_INDEX).sum(1)
    whole = term(None, position_batch(batch)) * counts.sum()
    parts = sum(
        term(None, position_batch({k: v[i : i + 1] for k, v in batch.items()})) * counts[i] for i in range(B)
    )
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)


def test_bf16_hidden_states_are_upcast(name):
    term = bound(name)
    batch = {k: v.detach() for k, v in make_batch(term).items()}
    low = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    rounded = {k: v.float() if v.is_floating_point() else v for k, v in low.items()}
    torch.testing.assert_close(term(None, position_batch(low)), term(None, position_batch(rounded)))


def test_projection_is_learned_when_widths_differ(name):
    term = bound(name, student_width=6, teacher_width=8)
    assert len(term.projections) == len(term.student_layers)
    batch = make_batch(term, student_width=6)
    term(None, position_batch(batch)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in term.projections.parameters())
    with pytest.raises(ValueError, match="projection=auto"):
        HiddenStateLoss(projection="never").setup(fake_model(6), fake_model(8))


def test_layer_indices_are_checked_and_negative_ones_resolved():
    term = HiddenStateLoss(layer_map=[[0, 0], [-1, -1]])
    term.setup(fake_model(8, layers=2), fake_model(8, layers=6))
    assert term.pairs == [(0, 0), (2, 6)]
    with pytest.raises(ValueError, match="student layer 3 is out of range"):
        HiddenStateLoss(layer_map=[[3, 1]]).setup(fake_model(8, layers=2), fake_model(8))
    with pytest.raises(RuntimeError, match="online teacher"):
        HiddenStateLoss()(None, PositionBatch(torch.zeros(1, 2, dtype=torch.long)))


def test_functional_forms():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([True, False, True])
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(hidden_cosine_distance(s, t, mask), (1 - cos)[mask].mean())
    torch.testing.assert_close(hidden_mse(s, t, mask), ((s - t) ** 2).mean(-1)[mask].mean())


# ------------------------------------------------------------------ wired into the modules, tiny real models


def build(tiny_dir, terms, width=24, chunk=None):
    tok = load_tokenizer(tiny_dir)
    teacher = load_causal_lm(tiny_dir)
    student = tiny_llama(len(tok), hidden_size=width, num_layers=1, num_heads=2, intermediate_size=48, seed=1)
    module = OnlineTeacherDistillModule(
        student,
        teacher,
        terms,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        loss_chunk_size=chunk,
    )
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:16], tok, 96)
    dm = TeacherTextDataModule(batch_size=8).connect(tok.pad_token_id, corpus)
    return module, next(iter(dm.train_dataloader()))


def test_feature_loss_trains_the_student_and_its_projection(tiny_dir):
    terms = {"feat": HiddenStateLoss(layer_map=[[1, -1]], distance="mse"), "ce": HardCrossEntropy(weight=0.0)}
    module, batch = build(tiny_dir, terms)
    assert module.teacher.config.hidden_size != 24 and len(terms["feat"].projections) == 1
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in terms["feat"].projections.parameters())
    assert any(k.startswith("loss_terms.feat.projections") for k in module.state_dict())
    values = fit_one_batch(module, batch, steps=30)
    assert values[-1] < 0.5 * values[0]


def test_fused_path_equals_plain_with_a_feature_term(tiny_dir):
    def terms():
        torch.manual_seed(0)
        return {
            "kd": ForwardKL("teacher"),
            "feat": HiddenStateLoss(layer_map=[[0, 0], [1, -1]]),
            "ce": HardCrossEntropy(),
        }

    plain, batch = build(tiny_dir, terms())
    fused, _ = build(tiny_dir, terms(), chunk=7)
    fused.load_state_dict(plain.state_dict())
    plain_loss = plain.training_step(batch, 0)
    fused_loss = fused.training_step(batch, 0)
    plain_loss.backward()
    fused_loss.backward()
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_feature_term_without_a_teacher_is_a_clear_error(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    module = DistillModule(
        tiny_llama(len(tok)),
        {"feat": HiddenStateLoss()},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    with pytest.raises(RuntimeError, match="online teacher"):
        module.loss_terms["feat"](None, PositionBatch(torch.zeros(1, 2, dtype=torch.long)))


def test_distilbert_recipe_sets_the_paper_weights(kdl_env):
    cfg = compose_cfg(["experiment=tiny", "recipe=distilbert", "teacher=local", "teacher.path=x"])
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    assert list(loss) == ["hard_ce", "hinton_kl", "hidden_cosine"]
    assert (loss["hard_ce"]["weight"], loss["hinton_kl"]["weight"], loss["hidden_cosine"]["weight"]) == (
        2.0,
        5.0,
        1.0,
    )
    assert loss["hinton_kl"]["distill_temperature"] == 2.0 and cfg.kd_target == "teacher"
