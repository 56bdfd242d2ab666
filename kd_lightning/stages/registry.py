"""The cached artifact kinds, one entry each: the only place to touch when a kind is added.

Each :class:`ArtifactKind` says where the kind lives (``artifacts/<name>/<key>``, what ``rebuild=[...]``
takes), which code builds it (the modules whose import closure, with the ``_target_``s of its config
entries, is its code fingerprint), and, for a soft-label store, the name loss terms read it by
(``kd_target``) and the stage function that builds it. The CLI reads the fingerprints and the ``rebuild``
names from here (``cli/build.py``); the training stage reads the stores (:func:`stores_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kd_lightning.data.soft_labels import SoftLabelStore
from kd_lightning.data.store_mixture import MixedStore
from kd_lightning.stages import estimate
from kd_lightning.stages.context import StageContext


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of cached artifact.

    Args:
        name: its folder under the artifacts root, and what ``rebuild=[...]`` takes.
        code: modules whose code builds it (their import closure enters its code fingerprint).
        config: dotted config entries whose ``_target_``s also enter that fingerprint.
        store: for a soft-label store, the name loss terms read it by (``kd_target``).
        build: for a store, the stage that builds (or loads) it.
        cli_stage: the ``kdl`` stage that builds it on its own, if any.
    """

    name: str
    code: tuple[str, ...]
    config: tuple[str, ...] = ()
    store: str | None = None
    build: Callable[[StageContext], SoftLabelStore] | None = None
    cli_stage: str | None = None


STORE_CODE = ("kd_lightning.estimation.stores",)

ARTIFACTS: tuple[ArtifactKind, ...] = (
    ArtifactKind("corpus", ("kd_lightning.data.corpus",), ("data",)),
    ArtifactKind("prior", STORE_CODE, ("estimator.prior", "store_format"), "prior", estimate.prior, "prior"),
    ArtifactKind("align", ("kd_lightning.modules.alignment",), ("alignment",), cli_stage="align"),
    ArtifactKind(
        "posterior",
        STORE_CODE,
        ("estimator.prior", "estimator.posterior", "store_format"),
        "posterior",
        estimate.posterior,
        "posterior",
    ),
    ArtifactKind(
        "proxy_agreement", STORE_CODE, ("estimator.posterior",), "proxy_agreement", estimate.proxy_agreement
    ),
    ArtifactKind(
        "teacher_logits",
        STORE_CODE,
        ("estimator.teacher_targets", "store_format"),
        "offline_teacher",
        estimate.offline_teacher,
        "teacher-logits",
    ),
    ArtifactKind(
        "teacher_logprobs",
        (*STORE_CODE, "kd_lightning.generation.logprobs"),
        store="teacher_logprobs",
        build=estimate.teacher_logprobs,
    ),
    ArtifactKind(
        "distill", ("kd_lightning.stages.train", "kd_lightning.modules.training"), cli_stage="distill"
    ),
    ArtifactKind("eval", ("kd_lightning.evaluation.results",), ("evaluation",), cli_stage="evaluate"),
)

KINDS: dict[str, ArtifactKind] = {kind.name: kind for kind in ARTIFACTS}
STORES: dict[str, ArtifactKind] = {kind.store: kind for kind in ARTIFACTS if kind.store is not None}
"""Soft-label name (a loss term's ``kd_target``) → the kind of store it reads."""


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
    """The store each soft-label name reads: a registered store (``prior`` ...), ``teacher:<name>`` (one of
    several teachers) or ``teacher_mixture`` (all of them)."""
    names = tuple(names)
    unknown = [
        n for n in names if n not in STORES and n != "teacher_mixture" and not n.startswith("teacher:")
    ]
    if unknown:
        known = [*sorted(STORES), "teacher:<name>", "teacher_mixture"]
        raise KeyError(f"no estimation stage produces soft labels {unknown[0]!r}; known: {known}")
    found: dict[str, SoftLabelStore | MixedStore] = {}
    for name in names:
        if name == "teacher_mixture":
            found[name] = estimate.teacher_mixture(ctx)
        elif name.startswith("teacher:"):
            found[name] = estimate.named_teacher(ctx, name.removeprefix("teacher:"))
        else:
            found[name] = STORES[name].build(ctx)
    return found
