"""The soft-label store artifacts: prior, posterior, proxy agreement, offline teacher and API log-probs.

Each builder takes plain objects (a :class:`~kd_lightning.artifacts.Workspace`, a
:class:`~kd_lightning.data.corpus.Corpus`, an estimator) and returns a
:class:`~kd_lightning.data.soft_labels.SoftLabelStore`, built once per provenance through
:meth:`Workspace.cached`. A store's provenance is also written into its ``meta.json`` and checked on load,
so a store is never read for a corpus or tokenizer it was not built for. What a builder needs from another
stage (the prior store, the aligned proxy) it receives as arguments; :mod:`kd_lightning.stages` wires them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_lightning.artifacts import Workspace, file_digest, model_identity, settings_key
from kd_lightning.atomic import atomic_json
from kd_lightning.data.corpus import Corpus
from kd_lightning.data.cross_tokenizer import ForeignTokenizer, MappedProxy
from kd_lightning.data.soft_labels import SoftLabelStore, write_store
from kd_lightning.data.store_format import StoreFormat, StoreWrite
from kd_lightning.data.store_size import store_bytes
from kd_lightning.distributed import process_group
from kd_lightning.estimation.agreement import ProxyAgreementEstimator
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder, served_teacher_store
from kd_lightning.generation.logprobs import build_logprob_store, read_logprobs
from kd_lightning.models.loading import freeze, load_causal_lm
from kd_lightning.models.vocabulary import tokenizer_fingerprint
from kd_lightning.teachers.served import ServedTeacher

log = logging.getLogger(__name__)

RESUMABLE = (".partial", ".stats.json")
"""Siblings of a store folder: shards of an interrupted build, and the build's figures."""


def frozen_on_device(path: Path | str, dtype: Any) -> torch.nn.Module:
    """A model to estimate with: loaded in ``dtype``, frozen, on this process's device."""
    return freeze(load_causal_lm(path, dtype=dtype)).to(process_group().device())


def stats_path(folder: Path) -> Path:
    """Where a store's build figures (seconds, rows, counts) are written, beside the store."""
    return folder.parent / f"{folder.name}.stats.json"


def _open(corpus: Corpus, provenance: dict[str, Any]) -> Callable[[Path], SoftLabelStore]:
    return lambda folder: SoftLabelStore(folder, expect=provenance, vocab_size=corpus.vocab_size)


def _size(
    corpus: Corpus, top_k: int, vocab_size: int | None = None, write: StoreWrite | None = None
) -> Callable[[], float]:
    """The plan's estimate of a store's bytes over the training rows (for the disk-full message)."""
    train = corpus.train
    rows = int(train.target_offsets()[-1])
    write = write or StoreWrite()
    vocab = vocab_size or corpus.vocab_size
    return lambda: store_bytes(rows, len(train), top_k, vocab, write.fmt, counts=write.draws is not None)


def formatted(provenance: dict[str, Any], write: StoreWrite) -> dict[str, Any]:
    """``provenance`` with the format its store is written in (:meth:`StoreWrite.key`: nothing for format 1,
    so its keys stay). The key only records it; the writer is handed ``write`` itself."""
    return {**provenance, **write.key()}


def prior_provenance(
    corpus: Corpus, estimator: NGramPriorEstimator, code: str | None, fmt: StoreFormat | None = None
) -> dict[str, Any]:
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": corpus.train.fingerprint,
        "counts": corpus.counts.fingerprint,
        "estimator": estimator.settings(),
        "code": code,
    }
    return formatted(provenance, StoreWrite(fmt or StoreFormat()))


def prior_store(
    workspace: Workspace,
    corpus: Corpus,
    estimator: NGramPriorEstimator,
    code: str | None = None,
    fmt: StoreFormat | None = None,
) -> SoftLabelStore:
    """The n-gram prior at every training target position (counts over the whole training split)."""
    provenance = prior_provenance(corpus, estimator, code, fmt)
    write = StoreWrite(fmt or StoreFormat())

    def build(folder: Path) -> SoftLabelStore:
        start = time.perf_counter()
        rows, stats, channels = estimator.estimate_with_channels(
            corpus.train, corpus.vocab_size, count_corpus=corpus.counts
        )
        store = write_store(
            folder,
            rows,
            corpus.train.target_offsets(),
            provenance,
            vocab_size=corpus.vocab_size,
            channels=channels,
            write=write,
        )
        atomic_json(stats_path(folder), {**stats, "seconds": time.perf_counter() - start})
        log.info("prior written to %s (%s)", folder, stats)
        return store

    return workspace.cached(
        "prior",
        provenance,
        build,
        _open(corpus, provenance),
        siblings=(".stats.json",),
        size_hint=_size(corpus, estimator.top_k, write=write),
    )


def posterior_provenance(
    corpus: Corpus,
    prior: dict[str, Any],
    proxy_key: str,
    estimator: ProxyPosteriorEstimator,
    code: str | None,
    fmt: StoreFormat | None = None,
) -> dict[str, Any]:
    """``prior`` is the prior's provenance; ``proxy_key`` the aligned proxy's key."""
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": prior["corpus"],
        "prior": settings_key(prior),
        "proxy": proxy_key,
        "estimator": estimator.settings(),
        "code": code,
    }
    return formatted(provenance, StoreWrite(fmt or StoreFormat()))


def posterior_store(
    workspace: Workspace,
    corpus: Corpus,
    provenance: dict[str, Any],
    estimator: ProxyPosteriorEstimator,
    prior: Callable[[], SoftLabelStore],
    aligned_proxy: Callable[[], Path],
    mapped: Callable[[], MappedProxy] | None = None,
    api_evidence: Callable[[], SoftLabelStore] | None = None,
    fmt: StoreFormat | None = None,
) -> SoftLabelStore:
    """The prior updated with R proxy draws per position (resumable shard by shard; under ``torchrun``
    every rank builds its shards of it, see :mod:`kd_lightning.distributed`).

    ``prior``, ``aligned_proxy`` and ``mapped`` (a proxy of another tokenizer) are called only when the
    store must be built. ``fmt``: the store format ``provenance`` was keyed with (:func:`posterior_provenance`).
    """
    write = StoreWrite(fmt or StoreFormat())

    def build(folder: Path) -> SoftLabelStore:
        prior_rows = prior()
        proxy = frozen_on_device(aligned_proxy(), estimator.proxy_dtype)
        start = time.perf_counter()
        store = estimator.estimate(
            proxy,
            corpus.train,
            prior_rows,
            corpus.pad_id,
            str(folder),
            provenance,
            mapped=None if mapped is None else mapped(),
            api_evidence=None if api_evidence is None else api_evidence(),
            write=write,
        )
        atomic_json(stats_path(folder), {"seconds": time.perf_counter() - start, "rows": store.num_rows})
        return store

    return workspace.cached(
        "posterior",
        provenance,
        build,
        _open(corpus, provenance),
        siblings=RESUMABLE,
        collective=True,
        size_hint=_size(corpus, estimator.top_k, write=write),
    )


def agreement_store(
    workspace: Workspace,
    corpus: Corpus,
    proxy_key: str,
    estimator: ProxyAgreementEstimator,
    aligned_proxy: Callable[[], Path],
    code: str | None = None,
) -> SoftLabelStore:
    """The aligned proxy's probability of each observed teacher token (Proxy-KD's position weights), one
    entry per training target position; keyed by the proxy like the posterior, so a new proxy rebuilds it."""
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": corpus.train.fingerprint,
        "proxy": proxy_key,
        "estimator": estimator.settings(),
        "code": code,
    }

    def build(folder: Path) -> SoftLabelStore:
        proxy = frozen_on_device(aligned_proxy(), estimator.proxy_dtype)
        start = time.perf_counter()
        store = estimator.estimate(
            proxy, corpus.train, corpus.pad_id, corpus.vocab_size, str(folder), provenance
        )
        atomic_json(stats_path(folder), {"seconds": time.perf_counter() - start, "rows": store.num_rows})
        return store

    return workspace.cached(
        "proxy_agreement",
        provenance,
        build,
        _open(corpus, provenance),
        siblings=RESUMABLE,
        collective=True,
        size_hint=_size(corpus, 1),
    )


def offline_teacher_store(
    workspace: Workspace,
    corpus: Corpus,
    teacher_path: str | None,
    targets: TeacherTargetBuilder,
    code: str | None = None,
    own: ForeignTokenizer | None = None,
    fmt: StoreFormat | None = None,
) -> SoftLabelStore:
    """An open teacher's sparse distributions at every training target position (resumable).

    ``own`` (with ``targets.own_tokenizer``): the teacher's tokenizer, for a teacher of another family;
    the store then keeps its ids and names its vocabulary in ``teacher_vocabulary``.
    """
    if teacher_path is None:
        raise ValueError(
            "the offline_teacher soft labels need an open teacher: add teacher=smollm2 "
            "(or teacher=local teacher.path=<HF folder>)"
        )
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": corpus.train.fingerprint,
        "teacher": model_identity(teacher_path),
        "targets": targets.settings(),
        "code": code,
    }
    write = StoreWrite(fmt or StoreFormat(), targets.k if targets.kind == "sampled" else None)
    provenance = formatted(provenance, write)
    if targets.own_tokenizer and own is None:
        raise ValueError("estimator.teacher_targets.own_tokenizer=true needs the teacher's tokenizer")
    vocab = corpus.vocab_size
    if own is not None:
        vocab = int(max(len(own.tokenizer), own.tokenizer.vocab_size))
        provenance["teacher_vocabulary"] = {"size": vocab, "tokenizer": tokenizer_fingerprint(own.tokenizer)}

    def build(folder: Path) -> SoftLabelStore:
        teacher = freeze(load_causal_lm(teacher_path))
        if own is None:
            corpus.check_model_vocabulary(teacher, teacher_path, "teacher")
        teacher.to(process_group().device())
        start = time.perf_counter()
        view = None if own is None else own.view(corpus.train, corpus.tokenizer)
        store = targets.estimate(teacher, corpus.train, corpus.pad_id, str(folder), provenance, view, write)
        atomic_json(stats_path(folder), {"seconds": time.perf_counter() - start, "rows": store.num_rows})
        return store

    def open_store(folder: Path) -> SoftLabelStore:
        return SoftLabelStore(folder, expect=provenance, vocab_size=vocab)

    return workspace.cached(
        "teacher_logits",
        provenance,
        build,
        open_store,
        siblings=RESUMABLE,
        collective=True,
        size_hint=_size(corpus, targets.k, vocab, write),
    )


def served_teacher_artifact(
    workspace: Workspace,
    corpus: Corpus,
    served: ServedTeacher,
    targets: TeacherTargetBuilder,
    code: str | None = None,
    fmt: StoreFormat | None = None,
) -> SoftLabelStore:
    """A served teacher's top-k rows at every training target position (resumable): the offline store of
    ``teacher=served``, keyed by the server, the model and the wire form."""
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": corpus.train.fingerprint,
        "teacher": served.identity(),
        "targets": targets.settings(),
        "code": code,
    }
    write = StoreWrite(fmt or StoreFormat())  # a server's rows are top-k, never draws
    provenance = formatted(provenance, write)
    served.check_k(targets.k)  # before any request, and before a folder for its shards exists
    served.resumable = True

    def build(folder: Path) -> SoftLabelStore:
        start = time.perf_counter()
        store = served_teacher_store(
            served, corpus.train, corpus.tokenizer, targets, str(folder), provenance, write
        )
        stats = {"seconds": time.perf_counter() - start, "rows": store.num_rows, **served.report()}
        atomic_json(stats_path(folder), stats)
        return store

    return workspace.cached(
        "teacher_logits",
        provenance,
        build,
        _open(corpus, provenance),
        siblings=RESUMABLE,
        size_hint=_size(corpus, targets.k, write=write),
    )


def teacher_logprobs_store(
    workspace: Workspace, corpus: Corpus, logprobs: str | None, code: str | None = None
) -> SoftLabelStore:
    """An API teacher's top-k log-probs (``data.logprobs``) aligned to every training target position."""
    if not logprobs:
        raise ValueError(
            "the teacher_logprobs soft labels need data.logprobs=<corpus folder>/logprobs.jsonl "
            "(written by kdl generate sampling.top_logprobs=K)"
        )
    provenance = {
        "tokenizer": corpus.tokenizer_fp,
        "corpus": corpus.train.fingerprint,
        "logprobs": file_digest(logprobs),
        "code": code,
    }

    def build(folder: Path) -> SoftLabelStore:
        store, stats = build_logprob_store(
            corpus.train, read_logprobs(logprobs), corpus.tokenizer, folder, provenance, corpus.vocab_size
        )
        atomic_json(stats_path(folder), stats)
        log.info("teacher log-probs written to %s (%s)", folder, stats)
        return store

    return workspace.cached(
        "teacher_logprobs", provenance, build, _open(corpus, provenance), siblings=(".stats.json",)
    )
