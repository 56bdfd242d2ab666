"""StageContext: the plain objects every stage reads (no Hydra), and the corpus, tokenised once."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lightning import Trainer

from kd_lightning.artifacts import Workspace
from kd_lightning.data.corpus import Corpus, CorpusSpec, build_corpus, records_by_key
from kd_lightning.data.cross_tokenizer import ForeignTokenizer
from kd_lightning.data.store_format import StoreFormat
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules.alignment import ProxyAlignment
from kd_lightning.teachers.served import ServedTeacher
from kd_lightning.teachers.source import TeacherSource


def __getattr__(name: str) -> Any:
    """``NamedTeacher``: its name before 0.2.0 made every teacher a :class:`TeacherSource`."""
    if name == "NamedTeacher":
        warnings.warn(
            "kd_lightning.stages.context.NamedTeacher is now kd_lightning.teachers.source.TeacherSource; "
            "the old name will be removed in v0.3.0",
            FutureWarning,
            stacklevel=2,
        )
        return TeacherSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class StageContext:
    """What the stages share.

    Args:
        workspace: the artifacts root (and which kinds to rebuild).
        tokenizer_path: the student's tokenizer (the prior is over its vocabulary; the proxy must share it).
        corpus_spec: the teacher text.
        prior_estimator: n-gram prior settings.
        posterior_estimator: proxy posterior settings.
        proxy_path: the open proxy (``smollm2``, a folder or a hub id).
        alignment: proxy fine-tuning settings.
        trainer_factory: ``(folder, run_name, max_epochs=None, validate=True, overrides=None) -> Trainer``.
        teacher_path: an open (white-box) teacher, if any.
        teacher_targets: how the offline-teacher store keeps the teacher's distributions.
        code: per artifact kind, a fingerprint of the code that builds it (part of every cache key).
        proxy_own_tokenizer: the proxy reads the records through its own tokenizer and template, and its
            draws are mapped to the student's tokens by text (``proxy.own_tokenizer``).
        served_teacher: builds the teacher behind a server (``teacher=served``), if that is the teacher.
        store_format: how the prior, posterior and offline-teacher stores are written (``store_format``).
        teachers: several named teachers (``teachers:``), each read through its own offline store.
        teacher_routing: a record field naming the teacher each training record is distilled from.
    """

    workspace: Workspace
    tokenizer_path: str
    corpus_spec: CorpusSpec
    prior_estimator: NGramPriorEstimator
    posterior_estimator: ProxyPosteriorEstimator
    proxy_path: str
    alignment: ProxyAlignment
    trainer_factory: Callable[..., Trainer]
    teacher_path: str | None = None
    teacher_targets: TeacherTargetBuilder = field(default_factory=TeacherTargetBuilder)
    code: Mapping[str, str] = field(default_factory=dict)
    proxy_own_tokenizer: bool = False
    served_teacher: Callable[[], ServedTeacher] | None = None
    store_format: StoreFormat = field(default_factory=StoreFormat)
    teachers: Mapping[str, TeacherSource] = field(default_factory=dict)
    teacher_routing: str | None = None
    _corpus: Corpus | None = field(default=None, init=False, repr=False)
    _proxy_tokenizer: list[ForeignTokenizer | None] = field(default_factory=list, init=False, repr=False)

    def corpus(self) -> Corpus:
        """The tokenised train / held-out corpus (built or loaded once per context)."""
        if self._corpus is None:
            self._corpus = build_corpus(
                self.workspace, self.corpus_spec, self.tokenizer_path, self.code.get("corpus")
            )
        return self._corpus

    def with_proxy(self, path: str, own_tokenizer: bool) -> StageContext:
        """This context with another proxy (a pipeline variant's), sharing the tokenised corpus."""
        if (path, own_tokenizer) == (self.proxy_path, self.proxy_own_tokenizer):
            return self
        other = replace(self, proxy_path=path, proxy_own_tokenizer=own_tokenizer)
        other._corpus = self._corpus
        return other

    def with_settings(self, settings: Mapping[str, Any], code: Mapping[str, str]) -> StageContext:
        """This context with some fields replaced (a pipeline variant's ``store_format``, ``teacher_targets``)
        and the code fingerprints of the stages they change; it shares the tokenised corpus and proxy."""
        if not settings:
            return self
        other = replace(self, **settings, code={**self.code, **code})
        other._corpus, other._proxy_tokenizer = self._corpus, self._proxy_tokenizer
        return other

    def with_alignment(self, alignment: ProxyAlignment, code: str | None) -> StageContext:
        """This context with another alignment of the proxy (a pipeline variant's, e.g. Proxy-KD's SFT + DPO
        beside v1's SFT), whose code fingerprint is ``code``; it shares the tokenised corpus."""
        other = replace(self, alignment=alignment, code={**self.code, "align": code})
        other._corpus = self._corpus
        if other.proxy_path == self.proxy_path:
            other._proxy_tokenizer = self._proxy_tokenizer
        return other

    def proxy_tokenizer(self) -> ForeignTokenizer | None:
        """The proxy's own tokenizer when it reads the records through it, else None.

        A proxy whose vocabulary is the student's takes the shared path even when asked for its own, so
        a same-tokenizer run gives exactly the same stores either way.
        """
        if not self.proxy_own_tokenizer:
            return None
        if not self._proxy_tokenizer:
            tokenizer = load_tokenizer(self.proxy_path)
            same = tokenizer.get_vocab() == self.corpus().tokenizer.get_vocab()
            records = {} if same else records_by_key(self.corpus_spec)
            own = ForeignTokenizer(tokenizer, records, self.corpus_spec.max_seq_len)
            self._proxy_tokenizer.append(None if same else own)
        return self._proxy_tokenizer[0]
