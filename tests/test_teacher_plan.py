"""The teacher plan: what a run's teacher is, decided once and read by both the stage and the module."""

from __future__ import annotations

import functools

import pytest
import torch

from kd_lightning.losses.cross_vocab import GoldHybrid
from kd_lightning.losses.terms import ForwardKL, HardCrossEntropy
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.foreign_teacher import ForeignTeacherDistillModule
from kd_lightning.modules.minillm import MiniLLMModule
from kd_lightning.modules.on_policy import FixedStudentData, OnPolicyDistillModule
from kd_lightning.modules.teacher import OnlineTeacherDistillModule
from kd_lightning.stages.teacher_plan import TeacherPlan
from kd_lightning.teachers.source import TeacherSource
from tests.helpers.tokenizers import byte_level_tokenizer


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1)


def test_the_plan_answers_from_the_module_and_the_terms():
    offline = TeacherPlan.of(
        DistillModule, {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL(kd_target="prior")}
    )
    assert not offline.online and offline.shares_vocabulary and offline.wanted_by == ()
    online = TeacherPlan.of(
        DistillModule,
        {"hard_ce": HardCrossEntropy(), "kl": ForwardKL(kd_target="teacher")},
        source=TeacherSource(model=lambda: None),
    )
    assert online.online and online.wanted_by == ("kl",)
    needs = TeacherPlan.of(functools.partial(MiniLLMModule, ppo_epochs=2), {"hard_ce": HardCrossEntropy()})
    assert needs.online and needs.module is MiniLLMModule  # the class behind a partial
    foreign = TeacherPlan.of(ForeignTeacherDistillModule, {"hard_ce": HardCrossEntropy()})
    assert foreign.online and not foreign.shares_vocabulary


def test_a_missing_teacher_is_refused_naming_the_term_or_the_module():
    with pytest.raises(ValueError, match="loss term 'kl' compares the student with the teacher"):
        TeacherPlan.of(DistillModule, {"kl": ForwardKL(kd_target="teacher")}).check()
    with pytest.raises(ValueError, match="MiniLLMModule compares the student"):
        TeacherPlan.of(MiniLLMModule, {"hard_ce": HardCrossEntropy()}).check()
    with pytest.raises(ValueError, match="ForeignTeacherDistillModule needs a teacher"):
        TeacherPlan.of(ForeignTeacherDistillModule, {}, source=TeacherSource(model=lambda: None)).check()


def test_the_teacher_tokenizer_and_the_vocabulary_match_are_made_once():
    loads = []

    def load():
        loads.append(1)
        return byte_level_tokenizer(300)

    plan = TeacherPlan.of(
        ForeignTeacherDistillModule, {}, source=TeacherSource(model=lambda: None), load_tokenizer=load
    )
    student_tokenizer = byte_level_tokenizer(280)
    terms = {"a": GoldHybrid(kd_target="teacher"), "b": GoldHybrid(kd_target="teacher")}
    plan.match_terms(terms, student_tokenizer)
    keywords = plan.keywords(student=None, teacher=None, tokenizer=student_tokenizer)
    assert plan.tokenizer() is keywords["teacher_tokenizer"] and len(loads) == 1
    assert terms["a"].match is terms["b"].match is plan.vocabulary_match(student_tokenizer)
    assert terms["a"].match is not None and len(terms["a"].match.student_ids) > 0


def test_a_module_without_loss_terms_is_refused_them_before_it_is_built():
    plan = TeacherPlan.of(
        MiniLLMModule, {"hard_ce": HardCrossEntropy()}, source=TeacherSource(model=lambda: None)
    )
    kept = plan.keywords(
        student=1, loss_terms={"hard_ce": HardCrossEntropy()}, loss_chunk_size=None, teacher=2
    )
    assert "loss_terms" not in kept and "loss_chunk_size" not in kept and kept["teacher"] == 2
    with pytest.raises(ValueError, match=r"takes no loss terms, but loss lists \['prior_kl'\]"):
        plan.keywords(loss_terms={"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL(kd_target="prior")})
    with pytest.raises(ValueError, match="does not chunk its losses"):
        plan.keywords(loss_terms={"hard_ce": HardCrossEntropy()}, loss_chunk_size=512)


def test_a_narrow_init_is_named_by_the_keywords_it_lacks():
    class Narrow(DistillModule):
        def __init__(self, student, loss_terms, optimizer):
            super().__init__(student, loss_terms, optimizer)

    plan = TeacherPlan.of(Narrow, {"hard_ce": HardCrossEntropy()})
    with pytest.raises(ValueError, match="does not accept scheduler, teacher, tokenizer"):
        plan.keywords(student=1, loss_terms={}, optimizer=2, scheduler=None, teacher=None, tokenizer=None)
    assert TeacherPlan.of(OnlineTeacherDistillModule, {}).keywords(anything=1) == {
        "anything": 1
    }  # **settings


def test_gkd_takes_the_distill_module_settings(tiny_dir):
    """GKD/DistiLLM pass the DistillModule settings on (they could not set shard_teacher or the fused path)."""
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_dir)
    module = OnPolicyDistillModule(
        load_causal_lm(tiny_dir),
        load_causal_lm(tiny_dir),
        {"jsd": ForwardKL(kd_target="teacher")},
        optimizer,
        tok,
        FixedStudentData(0.5),
        shard_teacher=False,
        fuse_sparse_terms=False,
    )
    assert module.shard_teacher is False and module.fuse_sparse_terms is False
