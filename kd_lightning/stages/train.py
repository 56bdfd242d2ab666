"""The training stage: ``kdl distill`` (one student), built from a :class:`StudentRun`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kd_lightning.data.corpus import records_by_key
from kd_lightning.data.cross_tokenizer import TeacherView, teacher_view
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.soft_labels import SoftLabelStore
from kd_lightning.data.token_alignment import match_vocabularies
from kd_lightning.losses.cross_vocab import CrossVocabularyTerm
from kd_lightning.losses.terms import LossTerm, soft_label_names
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.base import StudentModule, module_class
from kd_lightning.modules.training import train_student
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import stores_for

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
        teacher: builds the online teacher; None when no teacher is configured.
        loss_chunk_size: see :class:`~kd_lightning.modules.distill.DistillModule`.
        init_from: an HF folder to start the student from (a pipeline variant's earlier student).
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
    teacher: Callable[[], nn.Module] | None = None
    loss_chunk_size: int | None = None
    init_from: str | None = None
    trainer_overrides: Mapping[str, Any] | None = None
    teacher_tokenizer: Callable[[], Any] | None = None

    def reads_teacher(self) -> bool:
        """Whether the student's step runs the online teacher: a term compares with it, or the module needs it."""
        wants = any(getattr(t, "kd_target", None) == "teacher" for t in self.loss_terms.values())
        return wants or module_class(self.module).needs_teacher


def check_run(run: StudentRun) -> None:
    """Refuse, before any store is built, a run that cannot start: a missing teacher, a bad optimizer."""
    cls = module_class(run.module)
    if run.reads_teacher() and run.teacher is None:
        wants = [n for n, t in run.loss_terms.items() if getattr(t, "kd_target", None) == "teacher"]
        what = f"loss term {wants[0]!r} compares" if wants else f"{cls.__name__} compares"
        raise ValueError(
            f"{what} the student with the teacher, but no teacher is configured; "
            "add teacher=smollm2 (or teacher=local teacher.path=<HF folder>), or set kd_target=prior|posterior"
        )
    try:  # bad optimizer settings (lr < 0, betas out of range) fail now, not after the stores are built
        run.optimizer(params=[torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizer settings: {err}") from None


def build_student_module(
    run: StudentRun, tokenizer: Any, vocab_size: int, teacher_tokenizer: Any = None
) -> StudentModule:
    """The LightningModule of ``run``: every module is called with the same keywords (and
    ``teacher_tokenizer`` for a module whose teacher has its own vocabulary)."""
    student = load_causal_lm(run.init_from) if run.init_from else run.student()
    student_vocab = int(getattr(getattr(student, "config", None), "vocab_size", 0) or 0)
    if student_vocab and student_vocab < vocab_size:
        raise ValueError(
            f"the student has config.vocab_size={student_vocab} but the tokenizer has {vocab_size} ids; "
            "use a student built for this tokenizer"
        )
    teacher = run.teacher() if run.teacher is not None and run.reads_teacher() else None
    if teacher is not None and module_class(run.module).teacher_shares_vocabulary:
        refuse_another_vocabulary(run, tokenizer)
    arguments = {
        "student": student,
        "loss_terms": run.loss_terms,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "loss_chunk_size": run.loss_chunk_size,
        "teacher": teacher,
        "tokenizer": tokenizer,
    }
    if not module_class(run.module).teacher_shares_vocabulary:
        arguments["teacher_tokenizer"] = teacher_tokenizer
    try:
        return run.module(**arguments)
    except TypeError as err:
        if "argument" not in str(err):  # a TypeError from inside the module's own code
            raise
        name = module_class(run.module).__qualname__
        raise ValueError(
            f"module {name} cannot be built with the standard keywords ({err}); its __init__ must accept "
            f"{', '.join(arguments)} (take your own settings as keywords and pass **settings to the base class)"
        ) from err


def run_distill(ctx: StageContext, run: StudentRun) -> dict[str, Any]:
    """Train one student on its terms (reusing every store it reads), evaluate it, return its result row."""
    check_run(run)
    corpus = ctx.corpus()
    stores = stores_for(ctx, soft_label_names(run.loss_terms.values()))
    check_foreign_stores(ctx, run, stores)
    provenance = {
        "settings": {
            **run.settings,
            **({"init_from": str(run.init_from)} if run.init_from else {}),
            **({"trainer_overrides": dict(run.trainer_overrides)} if run.trainer_overrides else {}),
        },
        "corpus": corpus.train.fingerprint,
        "stores": {name: store.folder.name for name, store in stores.items()},
    }
    teacher_tokenizer, view = None, None
    if not module_class(run.module).teacher_shares_vocabulary:
        teacher_tokenizer, view = foreign_teacher_view(ctx, run)
    datamodule = run.datamodule.connect(corpus.pad_id, corpus.train, corpus.heldout, stores, view)
    return train_student(
        ctx.workspace,
        corpus,
        run.name,
        provenance,
        lambda: build_student_module(run, corpus.tokenizer, corpus.vocab_size, teacher_tokenizer),
        datamodule,
        ctx.trainer_factory,
        trainer_overrides=run.trainer_overrides,
    )


def check_foreign_stores(ctx: StageContext, run: StudentRun, stores: Mapping[str, SoftLabelStore]) -> None:
    """A store over a foreign teacher's vocabulary (``teacher_vocabulary`` in its provenance) is read only
    by cross-vocabulary terms; the GOLD hybrid gets the vocabulary match of the two tokenizers."""
    foreign = {name for name, store in stores.items() if "teacher_vocabulary" in store.provenance}
    for name, term in run.loss_terms.items():
        if not foreign.intersection(term.soft_labels):
            continue
        if not isinstance(term, CrossVocabularyTerm):
            raise ValueError(
                f"loss term {name!r} reads a store over the teacher's own vocabulary "
                f"({', '.join(sorted(foreign))}); use loss=[hard_ce,uld] or [hard_ce,gold_hybrid] with "
                f"loss.<term>.kd_target={term.kd_target}"
            )
        if hasattr(term, "set_vocabulary_match") and ctx.teacher_path is not None:
            term.set_vocabulary_match(
                match_vocabularies(ctx.corpus().tokenizer, load_tokenizer(ctx.teacher_path))
            )


def refuse_another_vocabulary(run: StudentRun, tokenizer: Any) -> None:
    """A teacher read on the student's token ids must give the same ids the same strings: one whose
    tokenizer maps them differently (even at an equal vocabulary size) would be compared token by token
    with the wrong tokens, silently. A teacher folder without a tokenizer is taken to share the student's."""
    if run.teacher_tokenizer is None or tokenizer is None:
        return
    try:
        teacher_tokenizer = run.teacher_tokenizer()
    except (OSError, ValueError):
        return
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({getattr(teacher_tokenizer, 'name_or_path', '?')}) maps tokens to ids "
            "differently from the student's; a teacher of another tokenizer needs module=foreign_teacher with "
            "loss=[hard_ce,uld] or loss=[hard_ce,gold_hybrid]"
        )


def foreign_teacher_view(ctx: StageContext, run: StudentRun) -> tuple[Any, TeacherView]:
    """The teacher's tokenizer and its view of the training corpus (its template, the position map)."""
    if run.teacher_tokenizer is None:
        raise ValueError(f"{module_class(run.module).__name__} needs a teacher: add teacher=<name or folder>")
    tokenizer = run.teacher_tokenizer()
    corpus = ctx.corpus()
    view = teacher_view(
        corpus.train,
        records_by_key(ctx.corpus_spec),
        corpus.tokenizer,
        tokenizer,
        ctx.corpus_spec.max_seq_len,
    )
    log.info("teacher tokenization: %.1f%% of the student's target positions aligned", 100 * view.coverage)
    return tokenizer, view
