"""From the composed config to the plain objects the stages take: a StageContext, StudentRuns, Variants.

This is where ``instantiate`` happens, and where a student's cache settings are read off the resolved
config: every config group the student is built from, whole, except what cannot change its result.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.artifacts import Workspace
from kd_lightning.cli.trainer import trainer_factory
from kd_lightning.code_fingerprint import code_fingerprint, targets_in
from kd_lightning.data.store_format import StoreFormat
from kd_lightning.losses.features import HiddenStateLoss
from kd_lightning.losses.terms import DivergenceTerm, LossTerm
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.stages.context import NamedTeacher, StageContext
from kd_lightning.stages.registry import ARTIFACTS, KINDS, check_rebuild
from kd_lightning.stages.train import StudentRun

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
    return StageContext(
        workspace=Workspace(cfg.paths.artifacts_dir, rebuild=check_rebuild(cfg.get("rebuild") or [])),
        tokenizer_path=str(cfg.tokenizer.path),
        corpus_spec=instantiate(cfg.data),
        prior_estimator=instantiate(cfg.estimator.prior),
        posterior_estimator=instantiate(cfg.estimator.posterior),
        proxy_path=model_path(cfg.proxy.path),
        alignment=instantiate(cfg.alignment),
        trainer_factory=trainer_factory(cfg),
        teacher_path=model_path(cfg.teacher.path) if cfg.get("teacher") and "path" in cfg.teacher else None,
        teacher_targets=instantiate(cfg.estimator.teacher_targets),
        code=stage_code(cfg),
        proxy_own_tokenizer=bool(cfg.proxy.get("own_tokenizer", False)),
        served_teacher=(lambda: instantiate(cfg.teacher)) if served(cfg.get("teacher")) else None,
        store_format=instantiate(cfg.store_format) if cfg.get("store_format") else StoreFormat(),
        teachers=named_teachers(cfg.get("teachers")),
        teacher_routing=cfg.get("teacher_routing"),
    )


def named_teachers(node: Any) -> dict[str, NamedTeacher]:
    """``teachers:`` → name → :class:`NamedTeacher`. Each entry is a teacher config (``path``, or a served
    teacher's ``base_url``/``model``/...) plus ``weight``."""
    found: dict[str, NamedTeacher] = {}
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
        if "base_url" in settings:
            settings.setdefault("_target_", "kd_lightning.teachers.served.ServedTeacher")
            served_node = OmegaConf.create(settings)
            found[str(name)] = NamedTeacher(
                str(name), served=lambda n=served_node: instantiate(n), weight=weight
            )
        else:
            path = settings.get("path")
            found[str(name)] = NamedTeacher(
                str(name), path=None if path is None else str(path), weight=weight
            )
    return found


def served(teacher: Any) -> bool:
    """Whether a teacher config is a teacher behind a server (``teacher=served``)."""
    return OmegaConf.is_dict(teacher) and "base_url" in teacher


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
    teacher_cfg = cfg.get("teacher")
    run = StudentRun(
        name=name,
        module=instantiate(module),
        student=lambda: instantiate(cfg.student),
        loss_terms=loss_terms(cfg, terms),
        datamodule=instantiate(cfg.datamodule),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        teacher=(lambda: instantiate(teacher_cfg)) if teacher_cfg else None,
        teacher_tokenizer=(lambda: load_tokenizer(model_path(teacher_cfg.path)))
        if teacher_cfg and "path" in teacher_cfg
        else None,
        loss_chunk_size=cfg.get("loss_chunk_size"),
        attn_implementation=cfg.get("student_attn_implementation"),
        trainer_overrides=trainer_overrides or None,
    )
    if served(teacher_cfg) and run.reads_teacher():
        refuse_served_online(run)
    run.settings = student_settings(cfg, terms, module, runs_teacher=run.reads_teacher())
    return run


def refuse_served_online(run: StudentRun) -> None:
    """A served teacher in the training step gives top-k rows only: the module must read them as such
    (its divergence terms), and nothing may ask for the whole distribution or hidden states."""
    module = run.teacher_plan.module
    if not module.reads_served_teacher:
        raise ValueError(
            f"{module.__name__} needs the teacher model in process (its whole distribution or its own "
            "tokenization), but teacher=served gives top-k log-probs; use teacher=local teacher.path=<folder>, "
            "or a word-level module (module=online_teacher, recipe=gkd, recipe=distillm)"
        )
    for name, term in run.loss_terms.items():
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
