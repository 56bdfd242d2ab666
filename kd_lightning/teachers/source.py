"""A teacher as one object: :class:`TeacherSource`.

A new kind of teacher is one subclass plus one config file: subclass :class:`TeacherSource` (say
``gives_rows`` and return a :class:`~kd_lightning.teachers.rows.TeacherRows` from :meth:`TeacherSource.online`)
and name it as the teacher config's ``_target_``; ``docs/architecture.md`` has a worked example.

What a teacher is (an open model run in process, or a server that scores prompts and gives top-k rows) is
decided once, where its config is read (``cli/build.py: teacher_source``), and every caller asks the source:
the stages for its path or its client (an offline store), the training stage for what the step reads
(:meth:`TeacherSource.online`), the run's :class:`~kd_lightning.stages.teacher_plan.TeacherPlan` for what it
refuses (:meth:`TeacherSource.refuse`). Nothing else sniffs a config for ``base_url`` or tests a
teacher's class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from kd_lightning.losses.features import HiddenStateLoss
from kd_lightning.losses.terms import DivergenceTerm, LossTerm
from kd_lightning.teachers.rows import ServedTeacherRows, TeacherRows
from kd_lightning.teachers.served import ServedTeacher


@dataclass(frozen=True)
class TeacherSource:
    """One teacher: an open model (``path``, built in process by ``model``) or a served one (``served``).

    Args:
        name: ``teachers.<name>`` for one of several teachers; None for the run's ``teacher``.
        path: the open model's folder or hub id (its tokenizer, and the offline store's key).
        model: builds the open model (the config's ``_target_``); None for a served teacher.
        served: builds the client of a served teacher (``teacher=served``: ``base_url``, ``model``, ``api``).
        weight: its weight in ``kd_target=teacher_mixture``.
    """

    name: str | None = None
    path: str | None = None
    model: Callable[[], nn.Module] | None = None
    served: Callable[[], ServedTeacher] | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        where = f"teachers.{self.name}" if self.name else "teacher"
        in_process = self.path is not None or self.model is not None
        if (self.served is not None and in_process) or not (in_process or self.gives_rows):
            raise ValueError(
                f"{where} needs either a path (an open model: {where}.path=<folder or hub id>) or a served "
                f"teacher ({where}.base_url=... and .model=...)"
            )
        if not self.weight >= 0:
            raise ValueError(f"{where}.weight must be >= 0, got {self.weight}")

    @property
    def is_served(self) -> bool:
        return self.served is not None

    @property
    def gives_rows(self) -> bool:
        """Whether the step reads top-k rows from it (:class:`~kd_lightning.teachers.rows.TeacherRows`) rather
        than a model in process; a kind of your own that gives rows says True."""
        return self.served is not None

    def online(self, tokenizer: Any, probe_ids: list[int] | None = None) -> nn.Module | TeacherRows:
        """What a training step reads: the open model (the module freezes it), or the server's top-k rows
        at each target position, checked with one probe on ``probe_ids`` to tokenize as the student does."""
        if self.served is None:
            if self.model is None:
                raise ValueError("this teacher names a folder but no model to build; set teacher.path")
            return self.model()
        rows = ServedTeacherRows(self.served(), tokenizer)
        if probe_ids:
            rows.check(probe_ids)
        return rows

    def refuse(self, module: type, loss_terms: Mapping[str, LossTerm]) -> None:
        """One line when this teacher cannot serve ``module``'s step with these terms (a teacher of top-k
        rows gives no whole distribution, no hidden states, no tokenization of its own)."""
        if not self.gives_rows:
            return
        if not getattr(module, "reads_served_teacher", False):
            raise ValueError(
                f"{module.__name__} needs the teacher model in process (its whole distribution or its own "
                "tokenization), but teacher=served gives top-k log-probs; use teacher=local teacher.path=<folder>, "
                "or a word-level module (module=online_teacher, recipe=gkd, recipe=distillm)"
            )
        for name, term in loss_terms.items():
            if isinstance(term, HiddenStateLoss):
                raise ValueError(
                    f"loss term {name!r} reads the teacher's hidden states, which a served teacher does not give; "
                    "use teacher=local teacher.path=<folder>"
                )
            if getattr(term, "kd_target", None) == "teacher" and not isinstance(term, DivergenceTerm):
                raise ValueError(
                    f"loss term {name!r} needs the teacher's whole distribution, but teacher=served gives its "
                    "top-k log-probs; use a divergence term (forward_kl, reverse_kl, generalized_jsd, ...)"
                )
