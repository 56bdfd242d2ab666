"""The training stage: ``kdl distill`` (one student), built from a :class:`StudentRun`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.data.corpus import records_by_key
from kd_lightning.data.cross_tokenizer import TeacherView, teacher_view
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.soft_labels import SoftLabelSource
from kd_lightning.losses.cross_vocab import CrossVocabularyTerm
from kd_lightning.losses.terms import LossTerm, soft_label_names
from kd_lightning.models.loading import check_attention_name, load_causal_lm, set_attention
from kd_lightning.modules.base import StudentModule
from kd_lightning.modules.training import train_student
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.registry import stores_for
from kd_lightning.stages.teacher_plan import TeacherPlan
from kd_lightning.teachers.source import TeacherSource

log = logging.getLogger(__name__)


@dataclass
class StudentRun:
    """Everything that trains one student, as plain objects.

    Args:
        name: run name (logs, tables).
        module: a partial of a :class:`~kd_lightning.modules.base.StudentModule` (the ``module`` config
            group). It is called with ``student``, ``loss_terms``, ``optimizer``, ``scheduler``,
            ``loss_chunk_size``, ``teacher`` and ``tokenizer``.
        student: builds the student (ignored when ``init_from`` names a trained student's folder).
        loss_terms: name → term (each carries its weight).
        datamodule: the (unconnected) teacher-text DataModule.
        optimizer: partial taking ``params``; scheduler: optional partial taking ``optimizer``.
        settings: the resolved settings the student depends on (its cache key, with the corpus, the
            stores' keys and ``init_from``).
        teacher: the run's teacher (:class:`~kd_lightning.teachers.source.TeacherSource`); None when no teacher
            is configured.
        loss_chunk_size: see :class:`~kd_lightning.modules.distill.DistillModule`.
        init_from: an HF folder to start the student from (a pipeline variant's earlier student).
        attn_implementation: the student's attention kernel while it trains (``student_attn_implementation``;
            None keeps the model's), set on whatever ``student`` or ``init_from`` gives.
        trainer_overrides: Trainer settings of this run only (a pipeline variant's ``trainer``).
        teacher_tokenizer: loads the teacher's own tokenizer (modules whose teacher has another vocabulary).
    """

    name: str
    module: Callable[..., StudentModule]
    student: Callable[[], nn.Module]
    loss_terms: Mapping[str, LossTerm]
    datamodule: TeacherTextDataModule
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    teacher: TeacherSource | None = None
    loss_chunk_size: int | None = None
    init_from: str | None = None
    attn_implementation: str | None = None
    trainer_overrides: Mapping[str, Any] | None = None
    teacher_tokenizer: Callable[[], Any] | None = None
    measure_heldout: bool = True
    """False for a search trial: scored on the validation split only (the held-out sets are for the final
    report)."""

    @property
    def teacher_plan(self) -> TeacherPlan:
        """What this run's teacher is (resolved once, then shared by the stage and the module's keywords)."""
        plan = self.__dict__.get("_teacher_plan")
        if plan is None:
            plan = TeacherPlan.of(self.module, self.loss_terms, self.teacher, self.teacher_tokenizer)
            self.__dict__["_teacher_plan"] = plan
        return plan

    def reads_teacher(self) -> bool:
        """Whether the student's step runs the online teacher: a term compares with it, or the module needs it."""
        return self.teacher_plan.online


def check_run(run: StudentRun) -> None:
    """Refuse, before any store is built, a run that cannot start: a missing teacher, a bad optimizer."""
    run.teacher_plan.check()
    if run.attn_implementation:
        check_attention_name(run.attn_implementation)
    try:  # bad optimizer settings (lr < 0, betas out of range) fail now, not after the stores are built
        run.optimizer(params=[torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizer settings: {err}") from None


def build_student_module(
    run: StudentRun, tokenizer: Any, vocab_size: int, probe_ids: list[int] | None = None
) -> StudentModule:
    """The LightningModule of ``run``, built with the keywords its teacher plan gives. A served teacher
    (``teacher=served``) becomes its top-k rows, checked against the student's tokenizer on ``probe_ids``."""
    plan = run.teacher_plan
    student = load_causal_lm(run.init_from) if run.init_from else run.student()
    if run.attn_implementation:
        set_attention(student, run.attn_implementation)
    student_vocab = int(getattr(getattr(student, "config", None), "vocab_size", 0) or 0)
    if student_vocab and student_vocab < vocab_size:
        raise ValueError(
            f"the student has config.vocab_size={student_vocab} but the tokenizer has {vocab_size} ids; "
            "use a student built for this tokenizer"
        )
    keywords = plan.keywords(
        student=student,
        loss_terms=run.loss_terms,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        loss_chunk_size=run.loss_chunk_size,
        teacher=None,
        tokenizer=tokenizer,
    )
    if plan.online and plan.source is not None:
        if plan.shares_vocabulary:
            refuse_another_vocabulary(plan, tokenizer)
        keywords["teacher"] = plan.source.online(tokenizer, probe_ids)
    module = run.module(**keywords)
    if run.init_from:
        module.load_companions(Path(run.init_from))
    return module


def run_distill(ctx: StageContext, run: StudentRun) -> dict[str, Any]:
    """Train one student on its terms (reusing every store it reads), evaluate it, return its result row."""
    check_run(run)
    plan = run.teacher_plan
    corpus = ctx.corpus()
    stores = stores_for(ctx, soft_label_names(run.loss_terms.values()))
    check_foreign_stores(run, stores)
    if plan.load_tokenizer is not None and (not plan.shares_vocabulary or foreign_store_names(stores)):
        plan.match_terms(run.loss_terms, corpus.tokenizer)
    provenance = {
        "settings": {
            **run.settings,
            **({"init_from": str(run.init_from)} if run.init_from else {}),
            **({"trainer_overrides": dict(run.trainer_overrides)} if run.trainer_overrides else {}),
        },
        "corpus": corpus.train.fingerprint,
        "stores": {name: store.key for name, store in stores.items()},
    }
    mixtures = {name: dict(store.parts) for name, store in stores.items() if store.parts}
    if mixtures:  # which teachers' stores, at which weights or routing
        provenance["teachers"] = mixtures
    view = None if plan.shares_vocabulary else foreign_teacher_view(ctx, plan)
    datamodule = run.datamodule.connect(corpus.pad_id, corpus.train, corpus.heldout, stores, view)
    return train_student(
        ctx.workspace,
        corpus,
        run.name,
        provenance,
        lambda: build_student_module(
            run, corpus.tokenizer, corpus.vocab_size, corpus.train.sequence(0).tolist()
        ),
        datamodule,
        ctx.trainer_factory,
        trainer_overrides=run.trainer_overrides,
        measure_heldout=run.measure_heldout,
    )


def foreign_store_names(stores: Mapping[str, SoftLabelSource]) -> set[str]:
    """The stores over a foreign teacher's vocabulary (``teacher_vocabulary`` in their provenance; a mixture
    has none: ``teachers:`` mixes rows over the student's vocabulary only)."""
    return {
        name for name, store in stores.items() if "teacher_vocabulary" in getattr(store, "provenance", {})
    }


def check_foreign_stores(run: StudentRun, stores: Mapping[str, SoftLabelSource]) -> None:
    """A store over a foreign teacher's vocabulary is read only by cross-vocabulary terms."""
    foreign = foreign_store_names(stores)
    for name, term in run.loss_terms.items():
        if foreign.intersection(term.soft_labels) and not isinstance(term, CrossVocabularyTerm):
            raise ValueError(
                f"loss term {name!r} reads a store over the teacher's own vocabulary "
                f"({', '.join(sorted(foreign))}); use loss=[hard_ce,uld] or [hard_ce,gold_hybrid] with "
                f"loss.<term>.kd_target={term.kd_target}"
            )


def refuse_another_vocabulary(plan: TeacherPlan, tokenizer: Any) -> None:
    """A teacher read on the student's token ids must give the same ids the same strings: one whose
    tokenizer maps them differently (even at an equal vocabulary size) would be compared token by token
    with the wrong tokens, silently. A teacher folder without a tokenizer is taken to share the student's."""
    if plan.load_tokenizer is None or tokenizer is None:
        return
    try:
        teacher_tokenizer = plan.tokenizer()
    except (OSError, ValueError):
        return
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({getattr(teacher_tokenizer, 'name_or_path', '?')}) maps tokens to ids "
            "differently from the student's; a teacher of another tokenizer needs module=foreign_teacher with "
            "loss=[hard_ce,uld] or loss=[hard_ce,gold_hybrid]"
        )


def foreign_teacher_view(ctx: StageContext, plan: TeacherPlan) -> TeacherView:
    """The teacher's view of the training corpus (its template, the position map)."""
    corpus = ctx.corpus()
    view = teacher_view(
        corpus.train,
        records_by_key(ctx.corpus_spec),
        corpus.tokenizer,
        plan.tokenizer(),
        ctx.corpus_spec.max_seq_len,
    )
    log.info("teacher tokenization: %.1f%% of the student's target positions aligned", 100 * view.coverage)
    return view
