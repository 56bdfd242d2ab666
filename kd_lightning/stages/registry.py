"""The cached artifact kinds and the soft-label names loss terms read: one entry each, the only place to
touch when a kind or a store name is added.

Each :class:`ArtifactKind` says where the kind lives (``artifacts/<name>/<key>``, what ``rebuild=[...]``
takes), which code builds it (the modules whose import closure, with the ``_target_``s of its config
entries, is its code fingerprint) and the ``kdl`` stage that builds it alone. Each :class:`SoftLabelEntry` is a
name a loss term reads (``kd_target``: ``prior``, ``teacher:<name>``, ``teacher_mixture`` ...): the artifact
kind its store is cached under, the stage function that builds (or loads) it, and the store files ``kdl plan``
sizes for it. The CLI reads the fingerprints and the ``rebuild`` names from here (``cli/build.py``), the
training stage the stores (:func:`stores_for`), ``kdl plan`` the sizes (:func:`store_sizes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kd_lightning.data.soft_labels import SoftLabelSource
from kd_lightning.data.store_format import StoreFormat
from kd_lightning.stages import estimate
from kd_lightning.stages.context import StageContext

API_LOGPROBS_K = 20
"""The most log-probs an API gives per token (OpenAI's and vLLM's cap): the teacher_logprobs store's K at most."""


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of cached artifact.

    Args:
        name: its folder under the artifacts root, and what ``rebuild=[...]`` takes.
        code: modules whose code builds it (their import closure enters its code fingerprint).
        config: dotted config entries whose ``_target_``s also enter that fingerprint.
        cli_stage: the ``kdl`` stage that builds it on its own, if any.
    """

    name: str
    code: tuple[str, ...]
    config: tuple[str, ...] = ()
    cli_stage: str | None = None


STORE_CODE = ("kd_lightning.estimation.stores",)

ARTIFACTS: tuple[ArtifactKind, ...] = (
    ArtifactKind("corpus", ("kd_lightning.data.corpus",), ("data",)),
    ArtifactKind("prior", STORE_CODE, ("estimator.prior", "store_format"), cli_stage="prior"),
    ArtifactKind("align", ("kd_lightning.modules.alignment",), ("alignment",), cli_stage="align"),
    ArtifactKind(
        "posterior",
        STORE_CODE,
        ("estimator.prior", "estimator.posterior", "store_format"),
        cli_stage="posterior",
    ),
    ArtifactKind("proxy_agreement", STORE_CODE, ("estimator.posterior",)),
    ArtifactKind(
        "teacher_logits",
        STORE_CODE,
        ("estimator.teacher_targets", "store_format"),
        cli_stage="teacher-logits",
    ),
    ArtifactKind("teacher_logprobs", (*STORE_CODE, "kd_lightning.generation.logprobs")),
    ArtifactKind(
        "distill", ("kd_lightning.stages.train", "kd_lightning.modules.training"), cli_stage="distill"
    ),
    ArtifactKind("eval", ("kd_lightning.evaluation.results",), ("evaluation",), cli_stage="evaluate"),
)

KINDS: dict[str, ArtifactKind] = {kind.name: kind for kind in ARTIFACTS}


@dataclass(frozen=True)
class StoreFiles:
    """One store's files as ``kdl plan`` sizes them (see :func:`kd_lightning.data.store_size.store_bytes`).

    Args:
        name: the store (a soft-label name; for a mixture, each part's).
        top_k: entries kept per row (at most, with ``at_most``).
        draws: its rows are draws, kept as counts under ``store_format.probabilities=counts``.
        channels: float32 numbers per row beside the entries (the prior's context counts and orders).
        fixed_format: written in this format whatever ``store_format`` says (None: the run's).
        at_most: ``top_k`` is a cap the source may not reach (an API's log-probs).
        note: what the size row adds after its formula.
    """

    name: str
    top_k: int
    draws: bool = False
    channels: int = 0
    fixed_format: StoreFormat | None = None
    at_most: bool = False
    note: str = ""


@dataclass(frozen=True)
class SoftLabelEntry:
    """A name loss terms read soft labels by (``kd_target``, a term's ``target``).

    Args:
        name: the name, or with ``pattern`` its prefix.
        pattern: ``name`` is a prefix (``teacher:`` matches ``teacher:<name>``).
        kind: the artifact kind its store is cached under (``rebuild=[kind]`` builds it afresh).
        build: ``(ctx, name)`` → the store it reads (built, or loaded from the cache).
        files: ``(ctx, name)`` → the store files behind it, for ``kdl plan``; a mixture lists its parts.
        shows: how the help and the errors write it (``teacher:<name>``).
        mixed: read as a mixture of stores, with no files of its own.
        compared: a divergence can compare the student with it (a ``kd_target``); False for a store that
            only weights positions (``proxy_agreement``).
    """

    name: str
    kind: str
    build: Callable[[StageContext, str], SoftLabelSource]
    files: Callable[[StageContext, str], list[StoreFiles]]
    pattern: bool = False
    shows: str = ""
    mixed: bool = False
    compared: bool = True

    def matches(self, name: str) -> bool:
        return name.startswith(self.name) if self.pattern else name == self.name

    @property
    def display(self) -> str:
        return self.shows or self.name


def _named_teacher_files(ctx: StageContext, name: str) -> list[StoreFiles]:
    targets = ctx.teacher_targets
    return [StoreFiles(name, targets.k, draws=targets.kind == "sampled")]


SOFT_LABELS: tuple[SoftLabelEntry, ...] = (
    SoftLabelEntry(
        "prior",
        "prior",
        lambda ctx, _: estimate.prior(ctx),
        lambda ctx, name: [StoreFiles(name, ctx.prior_estimator.top_k, channels=2)],
    ),
    SoftLabelEntry(
        "posterior",
        "posterior",
        lambda ctx, _: estimate.posterior(ctx),
        lambda ctx, name: [StoreFiles(name, ctx.posterior_estimator.top_k)],
    ),
    SoftLabelEntry(
        "proxy_agreement",
        "proxy_agreement",
        lambda ctx, _: estimate.proxy_agreement(ctx),
        lambda ctx, name: [StoreFiles(name, 1, fixed_format=StoreFormat(), note="one entry per position")],
        compared=False,
    ),
    SoftLabelEntry(
        "offline_teacher",
        "teacher_logits",
        lambda ctx, _: estimate.offline_teacher(ctx),
        lambda ctx, name: [
            StoreFiles(name, ctx.teacher_targets.k, draws=ctx.teacher_targets.kind == "sampled")
        ],
    ),
    SoftLabelEntry(
        "teacher_logprobs",
        "teacher_logprobs",
        lambda ctx, _: estimate.teacher_logprobs(ctx),
        lambda ctx, name: [StoreFiles(name, API_LOGPROBS_K, fixed_format=StoreFormat(), at_most=True)],
    ),
    SoftLabelEntry(
        "teacher:",
        "teacher_logits",
        lambda ctx, name: estimate.named_teacher(ctx, name.removeprefix("teacher:")),
        _named_teacher_files,
        pattern=True,
        shows="teacher:<name>",
    ),
    SoftLabelEntry(
        "teacher_mixture",
        "teacher_logits",
        lambda ctx, _: estimate.teacher_mixture(ctx),
        lambda ctx, _: [f for name in ctx.teachers for f in _named_teacher_files(ctx, f"teacher:{name}")],
        mixed=True,
    ),
)
"""Every soft-label name a loss term can read; :func:`soft_label_entry` finds a name's entry."""

STORES: dict[str, SoftLabelEntry] = {entry.name: entry for entry in SOFT_LABELS}
"""Soft-label name (a pattern's prefix) → its entry."""


def soft_label_entry(name: str) -> SoftLabelEntry:
    """The entry ``name`` reads, or one line naming the known names."""
    for entry in SOFT_LABELS:
        if entry.matches(name):
            return entry
    known = ", ".join(entry.display for entry in SOFT_LABELS)
    raise KeyError(f"no estimation stage produces soft labels {name!r}; known: {known}")


def check_rebuild(names: Iterable[str]) -> frozenset[str]:
    """``rebuild=[...]`` as a set of known kinds, or one line naming the unknown one and the choices."""
    names = frozenset(names)
    unknown = sorted(names - set(KINDS))
    if unknown:
        raise ValueError(
            f"rebuild={sorted(names)}: unknown artifact kind {unknown[0]!r}; choose from {list(KINDS)}"
        )
    return names


def stores_for(ctx: StageContext, names: Iterable[str]) -> dict[str, Any]:
    """The store each soft-label name reads (every name checked before any store is built)."""
    entries = {name: soft_label_entry(name) for name in names}
    return {name: entry.build(ctx, name) for name, entry in entries.items()}


def store_files(ctx: StageContext, names: Iterable[str]) -> list[tuple[str, list[StoreFiles]]]:
    """Each soft-label name with the store files ``kdl plan`` sizes for it (a mixture: its parts')."""
    return [(name, soft_label_entry(name).files(ctx, name)) for name in names]
