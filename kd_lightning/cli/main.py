"""``kdl <stage> [hydra overrides] [-m]`` — the only module that imports Hydra.

Stages: ``prior``, ``align``, ``posterior``, ``distill``, ``pipeline`` (everything, ending with a table), and
``teacher-logits`` (an open teacher's sparse distributions, stored for offline white-box KD), and
``evaluate`` (held-out metrics of trained students or any model folder), ``fidelity`` (estimates of an open
teacher against its true distributions) and ``generate`` (teacher corpora); ``kdl report`` (no Hydra) turns
a sweep's folders into a table and plots.
Each builds what it needs through :class:`kd_lightning.pipeline.Pipeline`, which caches every artifact by
the settings it depends on, so ``kdl distill`` after ``kdl posterior`` reuses the stores, and a multirun over
sampling rounds reuses the prior and the aligned proxy.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Callback, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import fault_point
from kd_lightning.atomic import atomic_json, atomic_write_text
from kd_lightning.cli.help import STAGES, answer_without_hydra, stage_help_resolver
from kd_lightning.cli.overrides import check_group_choices
from kd_lightning.code_fingerprint import code_fingerprint, targets_in
from kd_lightning.environment import (
    conf_dir,
    drop_blank_environment,
    env_setting,
    install_log_redaction,
    redact,
)
from kd_lightning.evaluation.fidelity import fidelity_table, score_estimates
from kd_lightning.generation.job import run_generation
from kd_lightning.losses.terms import LossTerm
from kd_lightning.models.loading import freeze, load_causal_lm, set_trust_remote_code
from kd_lightning.models.tiny_assets import tiny_assets_folder
from kd_lightning.pipeline import (
    Pipeline,
    Workspace,
    evaluation_table,
    fidelity_estimates,
    results_table,
    summarize_store,
)

log = logging.getLogger("kdl")


def wandb_mode() -> str:
    """online when an API key is configured, offline otherwise (runs can be synced later)."""
    if env_setting("WANDB_MODE"):
        return str(env_setting("WANDB_MODE"))
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )
    return "online" if has_key else "offline"


if not OmegaConf.has_resolver("kdl_wandb_mode"):
    OmegaConf.register_new_resolver("kdl_wandb_mode", wandb_mode)


def run_tags(stage: str, extra: Any = None) -> list[str]:
    """wandb tags: the stage plus ``run_tags`` (sweep files set these so a dashboard can filter them)."""
    extra = list(extra or [])
    return list(dict.fromkeys([stage, *(str(tag) for tag in extra)]))


def short_run_name(override_dirname: str, limit: int = 80) -> str:
    """A sweep job's run name from its overrides: ``ngram_order=3,sampling_rounds=16``.

    Keys are cut to their last component; ``experiment``, ``sweep``, ``logger``, ``run_name`` and
    ``hydra.*`` overrides are dropped; long names end in a hash, so folder names stay legal.
    """
    import hashlib

    kept = []
    for item in re.split(r"(?<!\\),", override_dirname):
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key or key.split(".")[0] in ("experiment", "sweep", "logger", "run_name", "hydra"):
            continue
        kept.append(f"{key.rsplit('.', 1)[-1]}={value}".replace("/", "_"))
    name = ",".join(kept) or "run"
    if len(name) > limit:
        name = name[: limit - 9] + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


if not OmegaConf.has_resolver("kdl_run_name"):
    OmegaConf.register_new_resolver("kdl_run_name", short_run_name)
if not OmegaConf.has_resolver("kdl_tags"):
    OmegaConf.register_new_resolver("kdl_tags", run_tags)
if not OmegaConf.has_resolver("kdl_pid"):  # output folders: two runs in the same second never share one
    OmegaConf.register_new_resolver("kdl_pid", os.getpid)
if not OmegaConf.has_resolver("kdl_stage_help"):  # kdl <stage> --help renders hydra.help.template
    OmegaConf.register_new_resolver("kdl_stage_help", stage_help_resolver)
if not OmegaConf.has_resolver("kdl_tiny"):  # experiment=tiny: $KDL_TINY, or tiny assets built once
    OmegaConf.register_new_resolver("kdl_tiny", lambda: str(tiny_assets_folder()))


class FinishWandb(Callback):
    """Close the wandb run when fit fails, so the next run of a pipeline/multirun starts clean.

    On success the pipeline closes it (:func:`kd_lightning.pipeline.close_loggers`) after logging the
    held-out figures into the same run.
    """

    @staticmethod
    def _finish_any() -> None:
        wandb = sys.modules.get("wandb")  # only if some logger imported it
        if wandb is not None and wandb.run is not None:
            wandb.finish()

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        if any(type(logger).__name__ == "WandbLogger" for logger in trainer.loggers):
            self._finish_any()


def trainer_factory(cfg: DictConfig):
    """``(run_dir, run_name, max_epochs=None, validate=True, overrides=None) -> Trainer`` with loggers and callbacks."""

    def build(
        folder: Path,
        name: str,
        max_epochs: int | None = None,
        validate: bool = True,
        overrides: Mapping[str, Any] | None = None,
    ) -> Trainer:
        loggers = []
        for lg in (cfg.get("logger") or {}).values():
            loggers.append(instantiate(lg, name=f"{cfg.run_name}-{name}"))
        if loggers:
            settings = {
                key: OmegaConf.to_container(cfg[key], resolve=True)
                if OmegaConf.is_config(cfg[key])
                else cfg[key]
                for key in cfg
                if key != "hydra"
            }
            for logger in loggers:
                logger.log_hyperparams({"kdl": settings, "run": name})
        callbacks = [
            instantiate(cb) for key, cb in (cfg.get("callbacks") or {}).items() if key != "model_checkpoint"
        ]
        if cfg.get("callbacks") and "model_checkpoint" in cfg.callbacks:
            callbacks.append(
                instantiate(cfg.callbacks.model_checkpoint, dirpath=str(Path(folder) / "checkpoints"))
            )
        if loggers:
            callbacks.append(FinishWandb())
        settings_override: dict[str, Any] = {
            "default_root_dir": str(folder),
            "logger": loggers or False,
            "callbacks": callbacks,
        }
        if max_epochs is not None and not cfg.trainer.get("fast_dev_run"):
            settings_override["max_epochs"] = max_epochs
        if not validate:
            settings_override["limit_val_batches"] = 0
        if not loggers:
            settings_override["log_every_n_steps"] = 1
        settings_override.update(overrides or {})
        return instantiate(cfg.trainer, **settings_override)

    return build


def model_path(node: Any) -> str:
    """A model slot's ``path``: a folder/name, or a ``_target_`` that builds a folder (proxy=smollm2_layers)."""
    return str(instantiate(node) if OmegaConf.is_config(node) else node)


BUILDERS = ("kd_lightning.pipeline",)
"""Modules whose code builds every artifact (their import closure is part of each code fingerprint)."""


def stage_code(cfg: DictConfig) -> dict[str, str]:
    """Per artifact kind, the fingerprint of the code that builds it: builders + the config's ``_target_``s."""

    def of(*nodes: Any, extra: tuple[str, ...] = ()) -> str:
        targets = [t for node in nodes for t in targets_in(OmegaConf.to_container(node, resolve=True))]
        return code_fingerprint([*BUILDERS, *extra, *targets])

    return {
        "corpus": of(cfg.data),
        "prior": of(cfg.estimator.prior),
        "align": of(cfg.alignment),
        "posterior": of(cfg.estimator.prior, cfg.estimator.posterior),
        "teacher_logits": of(cfg.estimator.teacher_targets),
        "teacher_logprobs": of(extra=("kd_lightning.generation.logprobs",)),
        "eval": of(cfg.evaluation),
    }


def build_pipeline(cfg: DictConfig) -> Pipeline:
    return Pipeline(
        workspace=Workspace(Path(cfg.paths.artifacts_dir)),
        tokenizer_path=str(cfg.tokenizer.path),
        corpus=instantiate(cfg.data),
        prior=instantiate(cfg.estimator.prior),
        posterior=instantiate(cfg.estimator.posterior),
        proxy_path=model_path(cfg.proxy.path),
        alignment=instantiate(cfg.alignment),
        trainer_factory=trainer_factory(cfg),
        teacher_path=model_path(cfg.teacher.path) if cfg.get("teacher") else None,
        teacher_targets=instantiate(cfg.estimator.teacher_targets),
        code=stage_code(cfg),
        rebuild=list(cfg.get("rebuild") or []),
    )


def loss_terms(cfg: DictConfig, names: list[str] | None = None) -> dict[str, LossTerm]:
    """Instantiate the selected loss terms (all of ``cfg.loss`` by default)."""
    available = cfg.get("loss") or {}
    names = list(available) if names is None else names
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(
            f"loss term {missing[0]!r} is not selected; add it, e.g. loss=[{','.join([*available, missing[0]])}]"
        )
    return {name: instantiate(available[name]) for name in names}


def distill_settings(cfg: DictConfig, terms: list[str]) -> dict[str, Any]:
    """The settings a distilled student depends on (its cache key)."""

    def resolved(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    pick = {
        k: resolved(cfg.get(k))
        for k in (
            "student",
            "teacher",
            "optimizer",
            "scheduler",
            "datamodule",
            "seed",
            "loss_chunk_size",
            "module",
        )
    }
    pick["loss"] = {n: resolved(cfg.loss[n]) for n in terms}
    trainer_keys = (
        "max_epochs",
        "max_steps",
        "precision",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "fast_dev_run",
        "limit_train_batches",
        "val_check_interval",  # decide which checkpoint a best-checkpoint module restores
        "limit_val_batches",
    )
    pick["trainer"] = {k: v for k, v in resolved(cfg.trainer).items() if k in trainer_keys}
    return pick


def run_distill(
    cfg: DictConfig,
    pipeline: Pipeline,
    name: str,
    terms: list[str],
    method: Any = None,
    init_from: str | None = None,
    trainer_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one student on ``terms`` (or with an on-policy ``method``), from ``student`` or an ``init_from`` folder."""
    seed_everything(cfg.seed, workers=True)
    method = cfg.get("method") if method is None else method
    selected = loss_terms(cfg, terms)
    wants_teacher = [n for n, t in selected.items() if getattr(t, "target", None) == "teacher"]
    if (wants_teacher or method) and not cfg.get("teacher"):
        what = f"loss term {wants_teacher[0]!r} compares" if wants_teacher else "on-policy methods compare"
        raise ValueError(
            f"{what} the student with the teacher, but no teacher is configured; "
            "add teacher=smollm2 (or teacher=local teacher.path=<HF folder>), or set kd_target=prior|posterior"
        )
    # an online teacher only when a term reads it in the step (kd_target=offline_teacher reads a store)
    teacher_cfg = cfg.get("teacher") if (wants_teacher or method or cfg.get("module")) else None
    factory = instantiate(method) if method else None
    overrides = dict(trainer_overrides or {})
    if factory is not None and getattr(getattr(factory, "func", None), "manual_optimization", False):
        overrides.setdefault("gradient_clip_val", None)  # the module clips its own updates (max_grad_norm)
    settings = distill_settings(cfg, terms)
    if method:
        settings["method"] = OmegaConf.to_container(method, resolve=True)
    if init_from:
        settings["init_from"] = str(init_from)
    if overrides:
        settings["trainer_overrides"] = overrides
    # the code that trains the student: builders, the module class and every _target_ it instantiates
    settings["code"] = code_fingerprint([*BUILDERS, "kd_lightning.modules.teacher", *targets_in(settings)])
    student_module = instantiate(cfg.module) if cfg.get("module") and not method else None

    def student_factory():
        return load_causal_lm(init_from) if init_from else instantiate(cfg.student)

    optimizer = instantiate(cfg.optimizer)
    try:  # bad optimizer settings (lr < 0, betas out of range) fail now, not after the stores are built
        optimizer(params=[torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizer settings: {err}") from None

    return pipeline.distill(
        name=name,
        student_factory=student_factory,
        loss_terms=selected,
        datamodule=instantiate(cfg.datamodule),
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        settings=settings,
        teacher_factory=(lambda: instantiate(teacher_cfg)) if teacher_cfg else None,
        loss_chunk_size=cfg.get("loss_chunk_size"),
        module_factory=factory,
        student_module=student_module,
        trainer_overrides=overrides or None,
    )


def variant_parts(cfg: DictConfig, name: str, spec: Any) -> dict[str, Any]:
    """A ``variants`` entry: a list of loss terms, or ``{loss, method, init_from, trainer}``.

    ``method`` names a file of ``conf/method/`` (with ``method_settings`` merged over it); ``init_from`` names
    an earlier variant whose trained student this one starts from (MiniLLM starts from SFT); ``trainer``
    overrides trainer settings for this variant only (e.g. ``max_steps``, ``val_check_interval``).
    """
    if not OmegaConf.is_dict(spec):
        return {"terms": list(spec), "method": None, "init_from": None, "trainer": None}
    unknown = set(spec) - {"loss", "method", "method_settings", "init_from", "trainer"}
    if unknown:
        raise KeyError(
            f"variant {name!r} has unknown keys {sorted(unknown)}; use loss, method, method_settings, init_from, trainer"
        )
    method = None
    if spec.get("method"):
        path = conf_dir() / "method" / f"{spec.method}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
            raise FileNotFoundError(
                f"variant {name!r}: no method {spec.method!r} in conf/method/ (known: {known})"
            )
        node = OmegaConf.merge(OmegaConf.load(path), spec.get("method_settings") or {})
        # resolve interpolations such as ${seed} against the run's config
        context = copy.deepcopy(cfg)
        OmegaConf.set_struct(context, False)
        context._variant_method = node
        method = context._variant_method
    trainer = OmegaConf.to_container(spec.trainer, resolve=True) if spec.get("trainer") else None
    return {
        "terms": list(spec.get("loss") or ["hard_ce"]),
        "method": method,
        "init_from": spec.get("init_from"),
        "trainer": trainer,
    }


def model_label(path: str) -> str:
    """A table label for a model folder: a trained student's run name, else the folder's name."""
    import json

    folder = Path(path)
    result = folder.parent / "result.json"
    if folder.name == "student" and result.is_file():
        return f"{json.loads(result.read_text()).get('name', 'student')} ({folder.parent.name})"
    return folder.name or path


def run_evaluate(cfg: DictConfig, pipeline: Pipeline) -> list[dict[str, Any]]:
    """Evaluate ``models_to_evaluate`` (or every trained student); log each row to the configured loggers."""
    spec = instantiate(cfg.evaluation)
    targets = [(model_label(str(p)), str(p)) for p in cfg.get("models_to_evaluate") or []]
    targets = targets or [(name, str(folder)) for name, folder in pipeline.trained_students()]
    if not targets:
        raise ValueError(
            "nothing to evaluate: train students first (kdl distill / kdl pipeline) or set models_to_evaluate=[<HF folder>,...]"
        )
    rows = []
    for name, path in targets:
        row = pipeline.evaluate(name, path, spec)
        rows.append(row)
        for node in (cfg.get("logger") or {}).values():
            logger = instantiate(node, name=f"{cfg.run_name}-{name}")
            logger.log_hyperparams(
                {"model": path, "evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True)}
            )
            logger.log_metrics({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
            logger.finalize("success")
        FinishWandb()._finish_any()
    return rows


def write_csv(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """One row per evaluated model, every column any row has (written atomically)."""
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def run_fidelity(cfg: DictConfig, pipeline: Pipeline) -> dict[str, Any]:
    """``kdl fidelity``: an open teacher treated as closed; how close does each estimate come to it?"""
    if not cfg.get("teacher"):
        raise ValueError(
            "kdl fidelity needs the open teacher that wrote the corpus: add teacher=smollm2 "
            "(with data=smollm2_self_instruct), or teacher=local teacher.path=<HF folder>"
        )
    spec = instantiate(cfg.fidelity)
    train, _ = pipeline.corpora()
    if len(train) < spec.records:
        log.warning("fidelity: the training split has %d records, fewer than fidelity.records", len(train))
    estimates = fidelity_estimates(pipeline, spec)
    teacher = freeze(load_causal_lm(pipeline.teacher_path))
    pipeline.check_shares_tokenizer(teacher, str(pipeline.teacher_path), "teacher")
    rows, arrays = score_estimates(
        teacher, train, pipeline.pad_id, pipeline.vocab_size(), estimates, spec.top_k, spec.batch_size
    )
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "fidelity_positions.npz", **arrays)
    write_csv(out_dir / "fidelity.csv", rows)
    table = fidelity_table(rows, spec.top_k)
    print(
        f"\nEstimate fidelity on {rows[0]['positions']} positions of {len(train)} records:\n{table}\n",
        flush=True,
    )
    for node in (cfg.get("logger") or {}).values():
        logger = instantiate(node, name=f"{cfg.run_name}-fidelity")
        for step, row in enumerate(rows):
            logger.log_metrics(
                {f"fidelity/{k}": row[k] for k in ("kl", "kl_median", "tv", "topk_recall")}, step=step
            )
        logger.finalize("success")
        FinishWandb._finish_any()
    return {"rows": rows, "table": table, "teacher": str(pipeline.teacher_path)}


def run_generate(cfg: DictConfig) -> dict[str, Any]:
    """``kdl generate``: instantiate the teacher backend and the task, write the corpus folder."""
    manifest = run_generation(
        task=instantiate(cfg.generation_task),
        backend=instantiate(cfg.teacher_backend),
        sampling=instantiate(cfg.sampling),
        corpus_dir=cfg.corpus_dir,
        cache_dir=cfg.cache_dir,
        progress=bool(cfg.progress),
    )
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(out_dir / "generate_result.json", manifest)
    return manifest


def run_stage(cfg: DictConfig) -> dict[str, Any] | None:
    """Run ``cfg.stage``; returns its results (printed, and saved under the Hydra output dir)."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    set_trust_remote_code(bool(cfg.get("trust_remote_code", False)))
    seed_everything(cfg.seed, workers=True)
    stage = cfg.stage
    if stage == "generate":
        return run_generate(cfg)
    pipeline = build_pipeline(cfg)
    if stage == "prior":
        store = pipeline.prior()
        result = {"prior": str(store.folder), **summarize_store(store)}
    elif stage == "align":
        result = {"aligned_proxy": str(pipeline.aligned_proxy())}
    elif stage == "posterior":
        store = pipeline.posterior()
        result = {"posterior": str(store.folder), **summarize_store(store)}
    elif stage == "distill":
        result = run_distill(cfg, pipeline, cfg.run_name, list(cfg.loss))
    elif stage == "teacher-logits":
        if not cfg.get("teacher"):
            raise ValueError(
                "kdl teacher-logits needs an open teacher: add teacher=smollm2 (or teacher=local teacher.path=...)"
            )
        store = pipeline.offline_teacher()
        result = {"offline_teacher": str(store.folder), **summarize_store(store)}
    elif stage == "evaluate":
        rows = run_evaluate(cfg, pipeline)
        result = {"rows": rows, "table": evaluation_table(rows)}
        write_csv(Path(cfg.paths.output_dir) / "evaluate.csv", rows)
        print(
            f"\nHeld-out teacher responses ({len(pipeline.corpora()[1])} records):\n{result['table']}\n",
            flush=True,
        )
    elif stage == "fidelity":
        result = run_fidelity(cfg, pipeline)
    elif stage == "pipeline":
        # an experiment drops an inherited variant by setting it to null
        variants: Mapping[str, Any] = {k: v for k, v in cfg.variants.items() if v is not None}
        if not variants:
            raise ValueError("variants is empty: list at least one, e.g. variants.sft_only=[hard_ce]")
        reads = {
            label
            for name, variant in variants.items()
            for term in loss_terms(cfg, variant_parts(cfg, name, variant)["terms"]).values()
            for label in term.soft_labels
        }
        # the proxy rows matter (and cost an alignment) only when some student learns from the posterior
        rows = (
            [pipeline.proxy_heldout(aligned=False), pipeline.proxy_heldout(aligned=True)]
            if "posterior" in reads
            else []
        )
        spec = instantiate(cfg.evaluation) if cfg.get("evaluate_students") else None
        trained: dict[str, str] = {}
        for name, variant in variants.items():
            parts = variant_parts(cfg, name, variant)
            init_from = None
            if parts["init_from"]:
                if parts["init_from"] not in trained:
                    raise KeyError(
                        f"variant {name!r} starts from {parts['init_from']!r}, which is not an earlier variant "
                        f"(earlier: {list(trained)}); list it before {name!r}"
                    )
                init_from = trained[parts["init_from"]]
            row = run_distill(
                cfg,
                pipeline,
                f"student {name}",
                parts["terms"],
                method=parts["method"],
                init_from=init_from,
                trainer_overrides=parts["trainer"],
            )
            trained[name] = str(Path(row["folder"]) / "student")
            if spec is not None:  # token accuracy, ECE, ROUGE-L (cached per student and spec)
                extra = pipeline.evaluate(row["name"], Path(row["folder"]) / "student", spec)
                row = {**row, **{k: v for k, v in extra.items() if k not in ("name", "model")}}
            rows.append({"variant": name, **row})
        table = results_table(rows)
        result = {
            "rows": rows,
            "table": table,
            **({"prior": summarize_store(pipeline.prior())} if "prior" in reads else {}),
            **({"posterior": summarize_store(pipeline.posterior())} if "posterior" in reads else {}),
        }
        print(f"\nHeld-out teacher responses ({len(pipeline.corpora()[1])} records):\n{table}\n", flush=True)
    else:  # pragma: no cover - guarded by main()
        raise ValueError(f"unknown stage {stage!r}")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fault_point("stage:before-result")
    atomic_json(out_dir / f"{stage}_result.json", result)
    if stage != "pipeline":
        log.info("%s: %s", stage, result)
    return result


def objective(result: Any, path: str) -> float:
    """The figure a sweeper optimises: ``nll``, or a path such as ``rows.-1.nll`` into the stage's result."""
    node = result
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(
                f"sweep_objective={path!r} is not in the {type(result).__name__} result (at {part!r}); "
                "use e.g. nll for kdl distill or rows.-1.nll for kdl pipeline"
            ) from None
    return float(node)


def redact_run_records() -> None:
    """Rewrite the run's ``.hydra/*.yaml`` without credentials (a key in ``base_url``, say).

    Hydra writes the composed config and the command line there before the task starts.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    runtime = HydraConfig.get()
    if not runtime.output_subdir:
        return
    for path in (Path(runtime.runtime.output_dir) / runtime.output_subdir).glob("*.yaml"):
        text = path.read_text()
        clean = redact(text)
        if clean != text:
            atomic_write_text(path, clean)


def _task(cfg: DictConfig) -> Any:
    install_log_redaction()  # Hydra has set up its handlers by now; no credential reaches a log file
    redact_run_records()
    try:
        result = run_stage(cfg)
        # Optuna and other optimising sweepers read the job's return value
        return objective(result, cfg.sweep_objective) if cfg.get("sweep_objective") else result
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, InstantiationException) as err:
        if env_setting("KDL_TRACEBACK"):
            raise
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        key = re.search(r"full_key: (\S+)", str(err)) if isinstance(err, InstantiationException) else None
        where = f" (in {key.group(1)})" if key else ""
        message = redact(str(cause).strip().strip("'\""))
        log.error("%s: %s%s", type(cause).__name__, message, where)
        print(
            f"kdl {cfg.stage}: error: {message}{where}  (set KDL_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    """Run ``kdl`` with ``argv`` (the console script, :mod:`kd_lightning.cli.kdl`, lands here for stages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    drop_blank_environment()  # WANDB_MODE= (set but empty) means unset, for wandb and oc.env alike
    # like `python -m`, the working folder is importable: a user's ./my_losses/ works as a _target_
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    if argv and argv[0] == "report":  # reads finished runs: plain arguments, no Hydra
        from kd_lightning.report import main as report_main

        report_main(argv[1:])
        return
    if answer_without_hydra(argv):
        return
    if argv[0] in ("-sc", "--shell-completion"):
        shell_completion(argv[1:])
        return
    stage = argv.pop(0)
    check_group_choices(stage, argv)
    sys.argv = [f"kdl-{stage}", *argv]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)(_task)()


def shell_completion(args: list[str]) -> None:
    """``kdl -sc install=bash`` prints the script; the shell then calls ``kdl -sc query=bash``.

    A query completes a stage name after ``kdl``, and after ``kdl <stage>`` hands the rest of the line to
    that stage's Hydra app (config groups, options and keys).
    """
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if any(a.startswith("query=") for a in args):
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(s for s in (*STAGES, "report") if s.startswith(prefix)))
            return
        stage = words[1]
        if stage not in STAGES:
            return
        os.environ["COMP_LINE"] = "kdl " + line.split(stage, 1)[1].lstrip()
    else:
        stage = "distill"  # install/uninstall print a script that does not depend on the stage
    sys.argv = ["kdl", "-sc", *args]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)(_task)()


if __name__ == "__main__":
    main()
