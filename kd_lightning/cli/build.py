"""From the composed config to the plain objects the stages take: a StageContext, StudentRuns, Variants.

This is where ``instantiate`` happens, and where a student's cache settings are read off the resolved
config: every config group the student is built from, whole, except what cannot change its result.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.artifacts import Workspace
from kd_lightning.cli.trainer import trainer_factory
from kd_lightning.code_fingerprint import code_fingerprint, targets_in
from kd_lightning.data.store_format import StoreFormat
from kd_lightning.losses.terms import LossTerm
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.registry import ARTIFACTS, KINDS, check_rebuild
from kd_lightning.stages.train import StudentRun
from kd_lightning.teachers.source import TeacherSource

log = logging.getLogger(__name__)

STUDENT_GROUPS = (
    "student", "module", "optimizer", "scheduler", "datamodule", "seed", "loss_chunk_size",
    "student_attn_implementation",
)  # fmt: skip
"""Config entries a trained student is built from (with its loss terms, the trainer and, if it runs one,
the teacher); each enters the student's cache key whole, resolved."""

RESULT_NEUTRAL_TRAINER = (
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "enable_checkpointing",
)
"""Trainer settings that cannot change a trained student (kept out of its cache key)."""

RESULT_NEUTRAL_CALLBACKS = ("model_checkpoint", "progress_bar")
"""Callbacks that cannot change a trained student (resume checkpoints, progress display)."""


def resolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def model_path(node: Any) -> str:
    """A model slot's ``path``: a folder/name, or a ``_target_`` that builds a folder (proxy=smollm2_layers)."""
    return str(instantiate(node) if OmegaConf.is_config(node) else node)


def kind_code(kind: str, nodes: list[Any] | tuple[Any, ...] = ()) -> str:
    """The code fingerprint of an artifact kind: its builder modules plus the ``_target_``s of ``nodes``."""
    targets = [t for node in nodes for t in targets_in(resolved(node))]
    return code_fingerprint([*KINDS[kind].code, *targets])


def align_code(alignment: Any) -> str:
    """The code fingerprint of a proxy alignment (its builder and the config's ``_target_``s, e.g. DPO's)."""
    return kind_code("align", [alignment])


def stage_code(cfg: DictConfig) -> dict[str, str]:
    """Per artifact kind built from the run's config (all but trained students, keyed by
    :func:`student_settings`), its code fingerprint: builders + the ``_target_``s of its config entries."""
    return {
        kind.name: kind_code(kind.name, [OmegaConf.select(cfg, entry) for entry in kind.config])
        for kind in ARTIFACTS
        if kind.name != "distill"
    }


def build_context(cfg: DictConfig) -> StageContext:
    """The StageContext of a run: workspace, corpus spec, estimators, model paths, trainer factory, code."""
    teacher = teacher_source(cfg.get("teacher"))
    return StageContext(
        workspace=Workspace(cfg.paths.artifacts_dir, rebuild=check_rebuild(cfg.get("rebuild") or [])),
        tokenizer_path=str(cfg.tokenizer.path),
        corpus_spec=instantiate(cfg.data),
        prior_estimator=instantiate(cfg.estimator.prior),
        posterior_estimator=instantiate(cfg.estimator.posterior),
        proxy_path=model_path(cfg.proxy.path),
        alignment=instantiate(cfg.alignment),
        trainer_factory=trainer_factory(cfg),
        teacher_path=teacher.path if teacher is not None else None,
        teacher_targets=instantiate(cfg.estimator.teacher_targets),
        code=stage_code(cfg),
        proxy_own_tokenizer=bool(cfg.proxy.get("own_tokenizer", False)),
        served_teacher=teacher.served if teacher is not None else None,
        store_format=instantiate(cfg.store_format) if cfg.get("store_format") else StoreFormat(),
        teachers=named_teachers(cfg.get("teachers")),
        teacher_routing=cfg.get("teacher_routing"),
    )


def teacher_source(node: Any, name: str | None = None, weight: float = 1.0) -> TeacherSource | None:
    """A teacher config node as its :class:`TeacherSource`: the one place that reads what kind of teacher a
    node is (a served teacher has ``base_url``; an open model ``path``). None for no teacher."""
    if node is None or not OmegaConf.is_dict(node) or not node:
        return None
    if source_class(node.get("_target_")):  # a kind of teacher of your own: the node builds its source
        source = instantiate(node)
        return dataclasses.replace(source, name=name, weight=weight) if name is not None else source
    if "base_url" in node:
        settings = OmegaConf.to_container(node, resolve=True)
        settings.setdefault("_target_", "kd_lightning.teachers.served.ServedTeacher")
        served_node = OmegaConf.create(settings)
        return TeacherSource(name, served=lambda: instantiate(served_node), weight=weight)
    path = node.get("path")
    build = (lambda: instantiate(node)) if "_target_" in node else None
    return TeacherSource(name, path=None if path is None else model_path(path), model=build, weight=weight)


def source_class(target: Any) -> bool:
    """Whether a ``_target_`` names a :class:`TeacherSource` subclass (a teacher kind of your own) rather than
    a model builder."""
    if not isinstance(target, str):
        return False
    module, _, name = target.rpartition(".")
    try:  # (not hydra's get_class: it logs an ERROR for every function, e.g. load_causal_lm)
        found = getattr(importlib.import_module(module), name)
    except (ImportError, ValueError, AttributeError):
        return False  # a path instantiate reports on itself
    return isinstance(found, type) and issubclass(found, TeacherSource)


def named_teachers(node: Any) -> dict[str, TeacherSource]:
    """``teachers:`` → name → :class:`TeacherSource`. Each entry is a teacher config (``path``, or a served
    teacher's ``base_url``/``model``/...) plus ``weight``."""
    found: dict[str, TeacherSource] = {}
    for name, entry in (node or {}).items():
        if not OmegaConf.is_dict(entry):
            raise ValueError(
                f"teachers.{name} must be a teacher config (path: ..., weight: ...), got {entry!r}"
            )
        settings = OmegaConf.to_container(entry, resolve=True)
        raw = settings.pop("weight", 1.0)
        try:
            weight = float(raw)
        except (TypeError, ValueError):
            raise ValueError(
                f"teachers.{name}.weight={raw!r} is not a number; set e.g. teachers.{name}.weight=0.5"
            ) from None
        source = teacher_source(OmegaConf.create(settings), str(name), weight)
        if source is None:
            raise ValueError(
                f"teachers.{name} is empty; set teachers.{name}.path=<folder> (or a served teacher)"
            )
        found[str(name)] = source
    return found


def loss_terms(cfg: DictConfig, names: list[str] | None = None) -> dict[str, LossTerm]:
    """Instantiate the selected loss terms (all of ``cfg.loss`` by default)."""
    available = cfg.get("loss") or {}
    names = list(available) if names is None else names
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(
            f"loss term {missing[0]!r} is not selected; add it, e.g. loss=[{','.join([*available, missing[0]])}]"
        )
    return {name: instantiate(renamed_term_keys(name, available[name])) for name in names}


RENAMED_TERM_KEYS = {"target": "kd_target"}
"""Keys of a loss term's config in earlier releases and the keys that replaced them (accepted until v0.3.0)."""


def renamed_term_keys(name: str, node: Any) -> Any:
    """A term's config with its old keys renamed (``target: prior`` → ``kd_target: prior``), one line each."""
    old = [key for key in RENAMED_TERM_KEYS if OmegaConf.is_dict(node) and key in node]
    if not old:
        return node
    node = node.copy()
    with open_dict(node):
        for key in old:
            new = RENAMED_TERM_KEYS[key]
            log.warning(
                "loss.%s.%s is now %s (%s: %s → %s: %s); the old name will be removed in v0.3.0",
                name,
                key,
                new,
                key,
                node[key],
                new,
                node[key],
            )
            if new not in node or OmegaConf.is_interpolation(node, new):
                node[new] = node[key]
            del node[key]
    return node


def student_settings(cfg: DictConfig, terms: list[str], module: Any, runs_teacher: bool) -> dict[str, Any]:
    """The resolved settings a student depends on (its cache key, with the code that trains it)."""
    settings = {key: resolved(cfg.get(key)) for key in STUDENT_GROUPS}
    settings["module"] = resolved(module)
    settings["loss"] = {n: resolved(cfg.loss[n]) for n in terms}
    settings["trainer"] = {k: v for k, v in resolved(cfg.trainer).items() if k not in RESULT_NEUTRAL_TRAINER}
    callbacks = resolved(cfg.get("callbacks")) or {}
    settings["callbacks"] = {k: v for k, v in callbacks.items() if k not in RESULT_NEUTRAL_CALLBACKS}
    settings["teacher"] = resolved(cfg.get("teacher")) if runs_teacher else None
    # the code that trains the student: builders, the module class and every _target_ it instantiates
    settings["code"] = kind_code("distill", [settings])
    return settings


def student_run(
    cfg: DictConfig,
    name: str,
    terms: list[str],
    module: Any = None,
    trainer_overrides: dict[str, Any] | None = None,
) -> StudentRun:
    """A StudentRun from the config: ``module`` (a config node) defaults to ``cfg.module``."""
    module = cfg.module if module is None else module
    teacher = teacher_source(cfg.get("teacher"))
    run = StudentRun(
        name=name,
        module=instantiate(module),
        student=lambda: instantiate(cfg.student),
        loss_terms=loss_terms(cfg, terms),
        datamodule=instantiate(cfg.datamodule),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        teacher=teacher,
        teacher_tokenizer=(lambda: load_tokenizer(teacher.path))
        if teacher is not None and teacher.path is not None
        else None,
        loss_chunk_size=cfg.get("loss_chunk_size"),
        attn_implementation=cfg.get("student_attn_implementation"),
        trainer_overrides=trainer_overrides or None,
    )
    if run.reads_teacher():
        run.teacher_plan.check()  # a teacher that cannot give what the step reads: one line, now
    run.settings = student_settings(cfg, terms, module, runs_teacher=run.reads_teacher())
    return run
