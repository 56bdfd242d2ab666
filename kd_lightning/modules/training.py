"""The trained-student artifact: fit a student module, save the student, score it on held-out text.

A student folder is ``distill/<key>/`` with ``student/`` (the HF model, its tokenizer and
``kdl_training.json``, landed in one rename) and ``result.json`` (held-out NLL + the training record), written
last. A run killed before ``result.json`` resumes: from ``checkpoints/last.ckpt`` while training, or by
only evaluating a student that was already saved.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer
from torch import nn

from kd_lightning.artifacts import (
    Workspace,
    fault_point,
    record_build_event,
    remove_leftovers,
    training_artifact,
    training_replica,
)
from kd_lightning.atomic import atomic_folder, atomic_json
from kd_lightning.data.corpus import Corpus
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.evaluation.nll import heldout_nll, require_finite
from kd_lightning.models.loading import load_causal_lm
from kd_lightning.modules.base import StudentModule

log = logging.getLogger(__name__)

TRAINING_RECORD = "kdl_training.json"
"""Saved inside a trained student's folder: what its ``result.json`` needs from training (seconds, terms,
best checkpoint), so a run killed between saving the student and writing the result can finish it."""


def train_student(
    workspace: Workspace,
    corpus: Corpus,
    name: str,
    provenance: Mapping[str, Any],
    build_module: Callable[[], StudentModule],
    datamodule: TeacherTextDataModule,
    trainer_factory: Callable[..., Trainer],
    max_epochs: int | None = None,
    trainer_overrides: Mapping[str, Any] | None = None,
    measure_heldout: bool = True,
) -> dict[str, Any]:
    """Train a student (resuming its last checkpoint) and evaluate it on the held-out text (cached).

    ``provenance`` is everything the student depends on (its resolved settings, the corpus, the stores'
    keys, the code); ``datamodule`` must already be connected to the corpus and the stores. A search trial
    (``measure_heldout=False``) is scored on the validation split only; the held-out NLL is added to its
    result when a later run asks for it.
    """

    def build(folder: Path) -> dict[str, Any]:
        if training_replica(folder):
            return train_as_replica(folder)
        remove_leftovers(folder, ".student.*")  # a save cut short by a kill
        if (folder / "student" / TRAINING_RECORD).is_file():  # killed after saving, before the result
            log.info("%s: the student was saved by an earlier run; evaluating it", folder)
            return finish_student(
                folder, corpus, name, load_causal_lm(folder / "student"), None, measure_heldout
            )
        module = build_module()
        overrides = {**module.trainer_overrides, **(trainer_overrides or {})}
        trainer = trainer_factory(folder, name, max_epochs=max_epochs, overrides=overrides or None)
        steps = StepRecord()
        trainer.callbacks.append(steps)
        start = time.perf_counter()
        with training_artifact(folder):  # Lightning's DDP processes re-run the command and join here
            trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(folder))
        seconds = time.perf_counter() - start
        record_build_event(folder, "train", start_step=steps.start, end_step=trainer.global_step)
        trained = unwrapped_module(module, trainer, build_module)
        best = restore_best_checkpoint(trained, trainer) if module.restores_best_checkpoint else None
        training = {
            "name": name,
            "loss_chunk_size": getattr(module, "loss_chunk_size", None),
            "terms": {n: t.weight for n, t in getattr(module, "loss_terms", {}).items()},
            "module": type(module).__name__,
            "train_seconds": seconds,
            "stores": dict(provenance.get("stores") or {}),  # the soft-label stores it was trained from
            **({"teachers": provenance["teachers"]} if "teachers" in provenance else {}),
            **({"best_checkpoint": best} if best else {}),
            **timing_summary(module),
            **last_validation(trainer),
        }
        # the student and what its result needs from training land in one rename
        with atomic_folder(folder / "student", lambda: fault_point("distill:before-student-rename")) as tmp:
            if hasattr(trained.student, "save_pretrained"):
                trained.student.save_pretrained(tmp)
                corpus.tokenizer.save_pretrained(tmp)
            trained.save_companions(tmp)  # models trained beside the student (GAD's discriminator)
            atomic_json(tmp / TRAINING_RECORD, training)
        fault_point("distill:student-saved")
        scored = trained.student
        if hasattr(scored, "save_pretrained"):  # scored as saved, as anyone who loads it sees it (an
            # attention kernel switched for training is not saved): so an evaluation can reuse the pass
            scored = load_causal_lm(folder / "student").to(next(scored.parameters()).device)
        result = finish_student(folder, corpus, name, scored, trainer, measure_heldout)
        # the checkpoints only resume an unfinished training (1.6 GB for SmolLM2 with AdamW's state): a
        # finished student keeps student/ and result.json
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return result

    def train_as_replica(folder: Path) -> dict[str, Any]:
        """One of Lightning's extra DDP processes: train along, then leave; rank 0 saves and evaluates."""
        module = build_module()
        overrides = {**module.trainer_overrides, **(trainer_overrides or {})}
        trainer = trainer_factory(folder, name, max_epochs=max_epochs, overrides=overrides or None)
        trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(folder))
        log.info("training process %d of %s is done; rank 0 saves the student", trainer.global_rank, folder)
        raise ReplicaFinished(folder)

    def load(folder: Path) -> dict[str, Any]:
        result = json.loads((folder / "result.json").read_text())
        if measure_heldout and "nll" not in result:  # a search trial's student, now wanted in full
            # (its validation figures are already in the result: only the held-out split is scored)
            metrics = student_metrics(
                load_causal_lm(folder / "student"), corpus, name, measure_validation="val_nll" not in result
            )
            result = {**result, **metrics}
            atomic_json(folder / "result.json", result)
        return result

    return workspace.cached("distill", provenance, build, load, done="result.json")


class StepRecord(Callback):
    """The optimizer step a fit started from (0, or a resumed checkpoint's), for the build record."""

    start: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.start = int(trainer.global_step)


class ReplicaFinished(Exception):
    """One of Lightning's extra DDP training processes finished its part: rank 0 saves and evaluates, so
    this process has nothing left to do (the CLI ends it with status 0)."""


def finish_student(
    folder: Path,
    corpus: Corpus,
    name: str,
    student: nn.Module,
    trainer: Trainer | None,
    measure_heldout: bool = True,
) -> dict[str, Any]:
    """Held-out NLL of a saved student (``nll``; skipped for a search trial, ``measure_heldout=False``) and
    its validation NLL (``val_nll``, when the corpus has a validation split), logged and written as
    ``result.json`` (never a non-finite one)."""
    folder.mkdir(parents=True, exist_ok=True)
    training = json.loads((folder / "student" / TRAINING_RECORD).read_text())
    metrics = student_metrics(student, corpus, name, measure_heldout)
    if trainer is not None:
        close_loggers(trainer, {f"heldout/{k}": v for k, v in metrics.items()})
    result = {**training, **metrics, "name": name, "folder": str(folder)}
    atomic_json(folder / "result.json", result)
    return result


def student_metrics(
    student: nn.Module,
    corpus: Corpus,
    name: str,
    measure_heldout: bool = True,
    measure_validation: bool = True,
) -> dict[str, Any]:
    """``nll``/``ppl``/``tokens`` on the held-out split (if asked) and ``val_*`` on the validation split (if
    asked and the corpus has one); a non-finite one is refused, so a diverged student is never cached."""
    metrics: dict[str, Any] = {}
    if measure_heldout:  # the whole pass is kept: an evaluation of the student on these records reuses it
        metrics.update(
            heldout_nll(student, corpus.heldout, corpus.pad_id, desc=f"eval {name}", keep_pass=True)
        )
    if measure_validation and corpus.validation is not None:
        found = heldout_nll(student, corpus.validation, corpus.pad_id, desc=f"validate {name}")
        metrics.update({f"val_{key}": value for key, value in found.items()})
    for key in ("nll", "val_nll"):
        require_finite(
            {"nll": metrics.get(key)},
            f"student {name!r}",
            "training diverged, so nothing was cached; lower optimizer.lr or check the soft-label stores",
        )
    return metrics


def trained_students(workspace: Workspace) -> list[tuple[str, Path]]:
    """(name, folder) of every student this workspace has finished training, oldest first."""
    found = []
    for result in sorted(workspace.root.glob("distill/*/result.json"), key=lambda p: p.stat().st_mtime):
        folder = result.parent / "student"
        if (folder / "config.json").is_file():
            found.append((json.loads(result.read_text())["name"], folder))
    return found


def close_loggers(trainer: Trainer, metrics: Mapping[str, float] | None = None) -> None:
    """Log a run's final figures (e.g. held-out NLL) to its own loggers, then close them.

    The figures land in the same wandb run / CSV file as the training curves, so a dashboard or
    ``kdl report`` finds them with the run's config. A wandb run is finished so that the next stage of a
    pipeline or multirun job starts a fresh one.
    """
    for logger in trainer.loggers:
        if metrics:
            logger.log_metrics(dict(metrics), step=trainer.global_step)
        logger.finalize("success")
    finish_wandb()


def finish_wandb() -> None:
    """Finish the wandb run, if a logger started one (wandb is imported only by its logger)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def unwrapped_module(
    module: StudentModule, trainer: Trainer, build: Callable[[], StudentModule]
) -> StudentModule:
    """The trained module with a plain student: ``module`` itself, except under FSDP.

    FSDP wraps the module in place: the student's layers become FSDP units and its parameters views into flat
    shards (mixed precision leaves some in bf16), which can be neither saved nor evaluated as they are. The
    full state dict, gathered as training ended (:meth:`StudentModule.on_train_end`: every rank takes part,
    rank 0 receives it on the CPU), is loaded into a freshly built module on the training device.
    """
    if module._fsdp_root() is None:
        return module
    state = module.gathered_state
    if not state:
        raise RuntimeError("FSDP training ended without gathering the student's full state (on_train_end)")
    fresh = build()
    fresh.load_state_dict(state)
    fresh.to(trainer.strategy.root_device)
    log.info("gathered the FSDP-trained student (%d tensors) into a plain model", len(state))
    return fresh


def restore_best_checkpoint(module: nn.Module, trainer: Trainer) -> str | None:
    """Load the best monitored checkpoint back into the module (``restores_best_checkpoint`` modules)."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if not best or not Path(best).is_file():
        log.warning("no best checkpoint was recorded (was validation run?); keeping the final student")
        return None
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    log.info("restored the best checkpoint %s", best)
    return best


def timing_summary(module: StudentModule) -> dict[str, float]:
    """Mean seconds per training step of each timed phase (on-policy modules time rollouts and updates), and
    the one-time cost of compiling the student."""
    summary = {f"{key}_per_step": sum(v) / len(v) for key, v in module.step_seconds.items() if v}
    if module.compile_seconds is not None:
        summary["compile_seconds"] = module.compile_seconds
    return summary


def last_validation(trainer: Trainer) -> dict[str, dict[str, float]]:
    """The last validation's figures (``val/nll``, GAD's ``val/pair_accuracy`` ...), kept in the training
    record: a run whose student is not scored on the held-out sets (a warm-up) still reports them."""
    figures = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1
    }
    return {"last_validation": figures} if figures else {}


def last_checkpoint(folder: Path) -> str | None:
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None
