"""What a run's teacher is, decided once: :class:`TeacherPlan`.

A student's run asks the same questions of its teacher in several places: does the training step run it
(a term compares with it, or the module needs it), does it read the student's token ids or its own, which
tokenizer it has, how its vocabulary matches the student's (the GOLD hybrid) and which keywords the module
gets. The plan answers each once, from the module's class and the loss terms, and both the stage (which
stores, which view of the corpus) and the module's construction read it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kd_lightning.data.token_alignment import VocabularyMatch, match_vocabularies
from kd_lightning.losses.terms import LossTerm
from kd_lightning.modules.base import StudentModule, module_class
from kd_lightning.teachers.source import TeacherSource

STANDARD_KEYWORDS = (
    "student",
    "loss_terms",
    "optimizer",
    "scheduler",
    "loss_chunk_size",
    "teacher",
    "tokenizer",
)
"""The keywords every student module is built with (``teacher_tokenizer`` too, for a module whose teacher
has its own vocabulary; ``loss_terms`` and ``loss_chunk_size`` not, for one that takes no loss terms)."""


@dataclass
class TeacherPlan:
    """A run's teacher, resolved once.

    Args:
        module: the student module's class.
        online: the training step runs the teacher model (a term has ``kd_target=teacher``, or the module
            needs a teacher).
        shares_vocabulary: the teacher is read on the student's token ids (else: through its own tokenizer
            and the teacher's view of the corpus).
        source: the teacher (:class:`~kd_lightning.teachers.source.TeacherSource`); None when no teacher is
            configured.
        load_tokenizer: loads the teacher's own tokenizer; None when the teacher names no folder.
        wanted_by: the loss terms that compare with the online teacher (for messages).
        loss_terms: the run's terms (what the teacher may refuse).
    """

    module: type[StudentModule]
    online: bool
    shares_vocabulary: bool
    source: TeacherSource | None = None
    load_tokenizer: Callable[[], Any] | None = None
    wanted_by: tuple[str, ...] = ()
    loss_terms: Mapping[str, LossTerm] = field(default_factory=dict, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _match: VocabularyMatch | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        module: Callable[..., StudentModule],
        loss_terms: Mapping[str, LossTerm],
        source: TeacherSource | None = None,
        load_tokenizer: Callable[[], Any] | None = None,
    ) -> TeacherPlan:
        """The plan of a module partial and its loss terms, with the run's teacher (None: none configured)."""
        cls_ = module_class(module)
        wanted = tuple(n for n, t in loss_terms.items() if getattr(t, "kd_target", None) == "teacher")
        return cls(
            module=cls_,
            online=bool(wanted) or cls_.needs_teacher,
            shares_vocabulary=cls_.teacher_shares_vocabulary,
            source=source,
            load_tokenizer=load_tokenizer,
            wanted_by=wanted,
            loss_terms=dict(loss_terms),
        )

    def check(self) -> None:
        """Refuse a plan that cannot run: the step reads a teacher but none is configured, or one that cannot
        give what the module and its terms read (a served teacher's top-k rows to MiniLLM)."""
        if self.online and self.source is not None:
            self.source.refuse(self.module, self.loss_terms)
        if self.online and self.source is None:
            what = (
                f"loss term {self.wanted_by[0]!r} compares"
                if self.wanted_by
                else f"{self.module.__name__} compares"
            )
            raise ValueError(
                f"{what} the student with the teacher, but no teacher is configured; "
                "add teacher=smollm2 (or teacher=local teacher.path=<HF folder>), or set kd_target=prior|posterior"
            )
        if not self.shares_vocabulary and self.load_tokenizer is None:
            raise ValueError(f"{self.module.__name__} needs a teacher: add teacher=<name or folder>")

    def tokenizer(self) -> Any:
        """The teacher's own tokenizer, loaded once; None when the teacher names no folder."""
        if self._tokenizer is None and self.load_tokenizer is not None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def vocabulary_match(self, student_tokenizer: Any) -> VocabularyMatch:
        """Which student and teacher tokens spell the same string (the GOLD hybrid), computed once."""
        if self._match is None:
            self._match = match_vocabularies(student_tokenizer, self.tokenizer())
        return self._match

    def match_terms(self, loss_terms: Mapping[str, LossTerm], student_tokenizer: Any) -> None:
        """Give every term that compares across vocabularies by matched tokens the vocabulary match."""
        for term in loss_terms.values():
            if hasattr(term, "set_vocabulary_match") and self.load_tokenizer is not None:
                term.set_vocabulary_match(self.vocabulary_match(student_tokenizer))

    def keywords(self, **standard: Any) -> dict[str, Any]:
        """The keywords this plan's module is built with: the standard ones it accepts, plus
        ``teacher_tokenizer`` for a module whose teacher has its own vocabulary. A module that takes no
        loss terms (MiniLLM) is refused any but ``hard_ce`` here, before it is built."""
        takes = self.module.takes_loss_terms
        if not takes:
            extra = sorted(set(standard.get("loss_terms") or {}) - {"hard_ce"})
            if extra:
                raise ValueError(
                    f"{self.module.__name__} has its own objective and takes no loss terms, but loss lists "
                    f"{extra}; use loss=[hard_ce] (ignored) with it, or a word-level method (gkd, distillm)"
                )
            if standard.get("loss_chunk_size") is not None:
                raise ValueError(
                    f"{self.module.__name__} does not chunk its losses; set loss_chunk_size=null"
                )
            standard = {k: v for k, v in standard.items() if k not in ("loss_terms", "loss_chunk_size")}
        if not self.shares_vocabulary:
            standard["teacher_tokenizer"] = self.tokenizer()
        missing = unaccepted(self.module, standard)
        if missing:
            raise ValueError(
                f"module {self.module.__qualname__} cannot be built with the standard keywords: its __init__ "
                f"does not accept {', '.join(missing)}; accept {', '.join(standard)} (take your own settings "
                "as keywords and pass **settings to the base class)"
            )
        return standard


def unaccepted(cls: type, keywords: Mapping[str, Any]) -> list[str]:
    """The keywords ``cls.__init__`` does not accept (none when it takes ``**kwargs``)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return []
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [k for k in keywords if k not in names]
