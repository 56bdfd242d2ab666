"""The estimation stages: ``kdl prior``, ``align``, ``posterior`` and ``teacher-logits``, the proxy-agreement
store Proxy-KD's weighting reads, and the stores a student reads (``stores_for``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_lightning.data.corpus import records_by_key
from kd_lightning.data.cross_tokenizer import ForeignTokenizer, MappedProxy
from kd_lightning.data.soft_labels import SoftLabelStore
from kd_lightning.data.store_mixture import MixedStore
from kd_lightning.data.token_alignment import first_token_map
from kd_lightning.distributed import process_group
from kd_lightning.estimation.agreement import ProxyAgreementEstimator
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.estimation.stores import (
    agreement_store,
    offline_teacher_store,
    posterior_provenance,
    posterior_store,
    prior_provenance,
    prior_store,
    served_teacher_artifact,
    teacher_logprobs_store,
)
from kd_lightning.evaluation.tables import summarize_store
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules.alignment import aligned_proxy, aligned_proxy_key
from kd_lightning.stages.context import StageContext
from kd_lightning.teachers.served import ServedTeacher


def prior(ctx: StageContext, estimator: NGramPriorEstimator | None = None) -> SoftLabelStore:
    """The n-gram prior store (``estimator`` overrides the context's, e.g. for a fidelity sweep)."""
    return prior_store(
        ctx.workspace, ctx.corpus(), estimator or ctx.prior_estimator, ctx.code.get("prior"), ctx.store_format
    )


def proxy_key(ctx: StageContext) -> str:
    own = ctx.proxy_tokenizer() is not None
    return aligned_proxy_key(ctx.corpus(), ctx.proxy_path, ctx.alignment, ctx.code.get("align"), own)


def align(ctx: StageContext) -> Path:
    """The proxy fine-tuned on the teacher text (SFT), as an HF folder."""
    if process_group().active:
        folder = ctx.workspace.path("align", proxy_key(ctx)) / "model"
        if not (folder / "config.json").is_file():
            raise ValueError(
                "the aligned proxy is not built yet, and proxy alignment does not run under torchrun: run "
                "`kdl align` (same settings) in one process first, then the data-parallel posterior"
            )
        return folder
    return aligned_proxy(
        ctx.workspace,
        ctx.corpus(),
        ctx.proxy_path,
        ctx.alignment,
        ctx.trainer_factory,
        ctx.code.get("align"),
        ctx.proxy_tokenizer(),
    )


def mapped_proxy(ctx: StageContext) -> Callable[[], MappedProxy] | None:
    """For a proxy of another tokenizer: builds its view of the training corpus and its token map."""
    own = ctx.proxy_tokenizer()
    if own is None:
        return None

    def build() -> MappedProxy:
        corpus = ctx.corpus()
        return MappedProxy(
            own.view(corpus.train, corpus.tokenizer),
            first_token_map(corpus.tokenizer, own.tokenizer),
            corpus.vocab_size,
        )

    return build


def posterior(ctx: StageContext, estimator: ProxyPosteriorEstimator | None = None) -> SoftLabelStore:
    """The posterior store: the prior updated with R draws of the aligned proxy per position."""
    corpus = ctx.corpus()
    estimator = estimator or ctx.posterior_estimator
    provenance = posterior_provenance(
        corpus,
        prior_provenance(corpus, ctx.prior_estimator, ctx.code.get("prior"), ctx.store_format),
        proxy_key(ctx),
        estimator,
        ctx.code.get("posterior"),
        ctx.store_format,
    )
    evidence = None
    if estimator.api_evidence_weight:
        evidence_store = teacher_logprobs(ctx)  # built (or checked) before the proxy pass
        provenance["api_evidence"] = evidence_store.folder.name
        evidence = lambda: evidence_store  # noqa: E731
    return posterior_store(
        ctx.workspace,
        corpus,
        provenance,
        estimator,
        prior=lambda: prior(ctx),
        aligned_proxy=lambda: align(ctx),
        mapped=mapped_proxy(ctx),
        api_evidence=evidence,
        fmt=ctx.store_format,
    )


def proxy_agreement(ctx: StageContext) -> SoftLabelStore:
    """The aligned proxy's probability of each teacher token (``weighting=proxy_agreement``), read from the
    proxy the posterior uses (Proxy-KD's preferred proxy under ``alignment=proxy_kd``)."""
    if ctx.proxy_tokenizer() is not None:
        raise ValueError(
            "weighting=proxy_agreement reads the proxy's probability of each teacher token, which a proxy of "
            "another tokenizer does not give; use a proxy of the student's tokenizer, or weighting=none"
        )
    return agreement_store(
        ctx.workspace,
        ctx.corpus(),
        proxy_key(ctx),
        ProxyAgreementEstimator.like(ctx.posterior_estimator),
        aligned_proxy=lambda: align(ctx),
        code=ctx.code.get("proxy_agreement"),
    )


def teacher_store(
    ctx: StageContext,
    path: str | None,
    served: Callable[[], ServedTeacher] | None,
    own: ForeignTokenizer | None = None,
) -> SoftLabelStore:
    """The offline store of one teacher: a served one's, or an open model's (``own``: its own tokenizer)."""
    if served is not None:
        return served_teacher_artifact(
            ctx.workspace, ctx.corpus(), served(), ctx.teacher_targets, ctx.code.get("teacher_logits"),
            ctx.store_format,
        )  # fmt: skip
    return offline_teacher_store(
        ctx.workspace, ctx.corpus(), path, ctx.teacher_targets, ctx.code.get("teacher_logits"), own,
        ctx.store_format,
    )  # fmt: skip


def offline_teacher(ctx: StageContext) -> SoftLabelStore:
    own = None
    if ctx.served_teacher is None and ctx.teacher_targets.own_tokenizer and ctx.teacher_path is not None:
        own = ForeignTokenizer(
            load_tokenizer(ctx.teacher_path), records_by_key(ctx.corpus_spec), ctx.corpus_spec.max_seq_len
        )
    return teacher_store(ctx, ctx.teacher_path, ctx.served_teacher, own)


def named_teacher(ctx: StageContext, name: str) -> SoftLabelStore:
    """The offline store of ``teachers.<name>`` (``kd_target=teacher:<name>``), built like ``kdl teacher-logits``
    with that teacher; its key names the teacher, so each has its own."""
    if name not in ctx.teachers:
        known = ", ".join(sorted(ctx.teachers)) or "none"
        raise ValueError(f"kd_target=teacher:{name}: teachers: has no {name!r} (it has: {known})")
    spec = ctx.teachers[name]
    if spec.served is None and ctx.teacher_targets.own_tokenizer:
        raise ValueError(
            "teachers: mixes rows over the student's vocabulary; a teacher of another tokenizer "
            "(estimator.teacher_targets.own_tokenizer=true) cannot be one of several teachers"
        )
    return teacher_store(ctx, spec.path, spec.served)


def teacher_mixture(ctx: StageContext) -> MixedStore:
    """All of ``teachers:`` as one store: their weighted mixture, or each record's routed teacher."""
    if not ctx.teachers:
        raise ValueError(
            "kd_target=teacher_mixture needs teachers: (name → a teacher config with a weight), e.g. "
            "+teachers.a.path=smollm2 +teachers.a.weight=0.7 +teachers.b.path=<folder> +teachers.b.weight=0.3"
        )
    stores = {name: named_teacher(ctx, name) for name in ctx.teachers}
    routes = None
    if ctx.teacher_routing:
        routes = record_routes(ctx, ctx.teacher_routing)
    return MixedStore(stores, {n: t.weight for n, t in ctx.teachers.items()}, routes)


def record_routes(ctx: StageContext, field_name: str) -> list[str]:
    """The value of each training record's ``field_name``: the teacher it is routed to."""
    train = ctx.corpus().train
    if train.record_keys is None:
        raise ValueError(
            "teacher_routing needs a corpus that records its records' keys; rebuild it (rebuild=[corpus])"
        )
    records = records_by_key(ctx.corpus_spec)
    routes = []
    for key in train.record_keys:
        fields = records[key][0].meta
        if field_name not in fields:
            raise ValueError(
                f"teacher_routing={field_name}: a training record has no field {field_name!r} (its fields: "
                f"{sorted(fields) or 'none besides the prompt and response'}); add it to every record"
            )
        routes.append(str(fields[field_name]))
    return routes


def teacher_logprobs(ctx: StageContext) -> SoftLabelStore:
    return teacher_logprobs_store(
        ctx.workspace, ctx.corpus(), ctx.corpus_spec.logprobs, ctx.code.get("teacher_logprobs")
    )


def run_prior(ctx: StageContext) -> dict[str, Any]:
    store = prior(ctx)
    return {"prior": str(store.folder), **summarize_store(store)}


def run_align(ctx: StageContext) -> dict[str, Any]:
    return {"aligned_proxy": str(align(ctx))}


def run_posterior(ctx: StageContext) -> dict[str, Any]:
    store = posterior(ctx)
    return {"posterior": str(store.folder), **summarize_store(store)}


def run_teacher_logits(ctx: StageContext) -> dict[str, Any]:
    if ctx.teacher_path is None and ctx.served_teacher is None:
        raise ValueError(
            "kdl teacher-logits needs an open teacher: add teacher=smollm2 (or teacher=local teacher.path=..., "
            "or teacher=served teacher.base_url=... for one behind a server)"
        )
    store = offline_teacher(ctx)
    return {"offline_teacher": str(store.folder), **summarize_store(store)}
