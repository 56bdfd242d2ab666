"""Trainers and loggers from the config: the only place that instantiates ``trainer``, ``logger``, ``callbacks``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import Callback, Trainer
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kd_lightning.modules.compiled import CompileStudent
from kd_lightning.modules.training import finish_wandb

log = logging.getLogger(__name__)


class FinishWandb(Callback):
    """Close the wandb run when fit fails, so the next run of a pipeline/multirun starts clean.

    On success the builder closes it (:func:`kd_lightning.modules.training.close_loggers`) after logging
    the held-out figures into the same run.
    """

    def on_exception(self, trainer: Trainer, pl_module, exception: BaseException) -> None:
        if any(type(logger).__name__ == "WandbLogger" for logger in trainer.loggers):
            finish_wandb()


def resolved_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's whole resolved config (without ``hydra``), as loggers record it.

    A value that interpolates Hydra's runtime config, which a config composed in a notebook lacks, is
    recorded as written (``${hydra:...}``) rather than failing the run."""
    settings: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        try:
            value = cfg[key]
            settings[key] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except InterpolationResolutionError:
            settings[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return settings


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays on it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def checked_precision(accelerator: str, precision: Any, has_bf16_units: bool | None = None) -> Any:
    """``precision``, or ``32-true`` with one logged line when bf16 is asked for on a CPU without bf16
    units (autocast would emulate it, slower than fp32)."""
    wants_bf16 = str(precision).startswith("bf16")
    if not wants_bf16 or accelerator != "cpu":
        return precision
    if has_bf16_units is None:
        has_bf16_units = cpu_has_bf16_units()
    if has_bf16_units:
        return precision
    if precision not in _WARNED:  # one line per process, not one per trainer
        _WARNED.add(precision)
        log.warning(
            "trainer.precision=%s: this CPU has no bf16 units (AVX512-BF16 / AMX), where bf16 runs slower than "
            "fp32; training in fp32 (32-true) instead",
            precision,
        )
    return "32-true"


_WARNED: set[Any] = set()
MODULE_SETTINGS = ("compile", "ddp_find_unused_parameters")
"""Keys of a module's ``trainer_overrides`` that are ours, not Trainer arguments."""


def launches_processes(cfg: DictConfig) -> bool:
    """Whether the trainer config starts several training processes (DDP, FSDP over more than one device)."""
    strategy = cfg.trainer.get("strategy")
    if strategy is None or (isinstance(strategy, str) and strategy in ("auto", "single_device")):
        return False
    return str(cfg.trainer.get("devices", 1)) not in ("1", "[0]")


def run_label(cfg: DictConfig, name: str) -> str:
    """The logger's name for one trainer of a run: ``<run_name>-<name>``.

    ``run_name`` interpolates Hydra's runtime config, which a config composed in a notebook
    (``hydra.compose``) lacks; there the stage's name stands in for it."""
    run_name = OmegaConf.select(cfg, "run_name", throw_on_resolution_failure=False)
    run_name = str(run_name or cfg.get("stage") or "kdl")
    return name if name == run_name else f"{run_name}-{name}"


def trainer_factory(cfg: DictConfig):
    """``(run_dir, run_name, max_epochs=None, validate=True, overrides=None) -> Trainer`` with loggers and callbacks."""

    def build(
        folder: Path,
        name: str,
        max_epochs: int | None = None,
        validate: bool = True,
        overrides: Mapping[str, Any] | None = None,
    ) -> Trainer:
        loggers = [instantiate(lg, name=run_label(cfg, name)) for lg in (cfg.get("logger") or {}).values()]
        if loggers:
            settings = resolved_settings(cfg)
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
        trainer_node = OmegaConf.masked_copy(cfg.trainer, [k for k in cfg.trainer if k != "compile"])
        if (overrides or {}).get("compile", cfg.trainer.get("compile")):  # ours, not a Trainer argument
            callbacks.append(CompileStudent())
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
        settings_override.update({k: v for k, v in (overrides or {}).items() if k not in MODULE_SETTINGS})
        strategy = settings_override.get("strategy", cfg.trainer.get("strategy"))
        if (overrides or {}).get("ddp_find_unused_parameters") and strategy == "ddp":
            settings_override["strategy"] = "ddp_find_unused_parameters_true"
        precision = settings_override.get("precision", cfg.trainer.get("precision"))
        accelerator = str(settings_override.get("accelerator", cfg.trainer.get("accelerator", "auto")))
        if precision is not None and checked_precision(accelerator, precision) != precision:
            settings_override["precision"] = "32-true"
        return instantiate(trainer_node, **settings_override)

    return build


def log_rows(
    cfg: DictConfig,
    rows: list[dict[str, Any]],
    prefix: str,
    run: str,
    hyperparams: Mapping | None = None,
    keys: tuple[str, ...] | None = None,
):
    """Log result rows to every configured logger: one run per row when ``run`` names a field of the rows,
    else all rows into one run named ``run``, a step each. ``keys`` limits the figures logged."""
    per_row = any(run in row for row in rows)
    for node in (cfg.get("logger") or {}).values():
        logger = None
        for step, row in enumerate(rows):
            if logger is None or per_row:
                logger = instantiate(node, name=f"{cfg.run_name}-{row.get(run, run)}")
                if hyperparams:
                    logger.log_hyperparams({**hyperparams, "model": row.get("model")})
            figures = {
                k: v for k, v in row.items() if isinstance(v, (int, float)) and (keys is None or k in keys)
            }
            logger.log_metrics(
                {f"{prefix}/{k}": v for k, v in figures.items()}, step=None if per_row else step
            )
            if per_row:
                logger.finalize("success")
                finish_wandb()
        if logger is not None and not per_row:
            logger.finalize("success")
            finish_wandb()
