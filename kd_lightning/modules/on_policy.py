"""On-policy and mixed-policy word-level KD: GKD (arXiv 2306.13649) and DistiLLM (arXiv 2402.03898).

Both train on a divergence between teacher and student *token distributions*, like
:class:`~kd_lightning.modules.teacher.OnlineTeacherDistillModule`, but some batches carry the student's own
samples instead of the teacher text (what the student will condition on at inference time). Which batches
is a :class:`StudentDataSchedule`:

* :class:`FixedStudentData` (GKD): each batch is replaced by fresh student samples with probability λ
  (``student_data_fraction``; GKD's default divergence is JSD(β), ``loss=[generalized_jsd]``).
* :class:`AdaptiveStudentData` (DistiLLM): the probability φ starts at ``initial_fraction`` and grows by
  ``fraction_step`` whenever the validation loss rises by ``loss_tolerance`` or more; fresh samples go into a
  replay buffer and, later in training, batches are increasingly drawn from it instead of generating anew
  (off-policy reuse that cuts the generation cost). DistiLLM pairs it with skew KL (``loss=[skew_forward_kl]``).

On a student-sample batch only terms that compare with the online teacher apply (``kd_target: teacher``); the
hard CE and store-based terms apply to teacher-text batches only (their labels and stores index the
teacher text).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_lightning.data.batch import TextBatch
from kd_lightning.losses.terms import LossTerm
from kd_lightning.modules.teacher import OnlineTeacherDistillModule
from kd_lightning.rollout import prompts_from_batch, sample_rollouts

SOURCES = ("teacher_text", "fresh", "replay")


class StudentDataSchedule:
    """Chooses each batch's source: ``teacher_text``, ``fresh`` student samples or a ``replay`` of old ones."""

    replay_capacity: int = 0

    def choose(self, step: int, total_steps: int, draw: float, replay_size: int) -> str:  # pragma: no cover
        raise NotImplementedError

    def observe_validation_loss(self, loss: float) -> None:
        """Hook called after each validation with ``val/nll``."""

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        pass


@dataclass
class FixedStudentData(StudentDataSchedule):
    """GKD: fresh student samples with probability ``student_data_fraction`` (λ; 1.0 is fully on-policy)."""

    student_data_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.student_data_fraction <= 1.0:
            raise ValueError(f"student_data_fraction must be in [0, 1], got {self.student_data_fraction}")

    def choose(self, step: int, total_steps: int, draw: float, replay_size: int) -> str:
        return "fresh" if draw < self.student_data_fraction else "teacher_text"


@dataclass
class AdaptiveStudentData(StudentDataSchedule):
    """DistiLLM's adaptive off-policy schedule.

    With φ the current student-data probability and s = step / total_steps: a batch is student data with
    probability φ; of those, fresh samples with probability ``1 − s`` (or always while the buffer is not yet
    full), else a replay. φ grows by ``fraction_step`` (capped at 1) when ``val/nll`` is at least
    ``loss_tolerance`` above the last loss that raised it.
    """

    initial_fraction: float = 0.0
    fraction_step: float = 0.1
    loss_tolerance: float = 0.1
    replay_capacity: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_fraction <= 1.0 or not 0.0 < self.fraction_step <= 1.0:
            raise ValueError("initial_fraction must be in [0, 1] and fraction_step in (0, 1]")
        if self.replay_capacity < 1 or self.loss_tolerance < 0:
            raise ValueError("replay_capacity must be >= 1 and loss_tolerance >= 0")
        self.fraction = float(self.initial_fraction)
        self.reference_loss: float | None = None

    def choose(self, step: int, total_steps: int, draw: float, replay_size: int) -> str:
        if draw >= self.fraction:
            return "teacher_text"
        fresh_share = 1.0 - min(step / max(total_steps, 1), 1.0)
        if draw < self.fraction * fresh_share or replay_size < self.replay_capacity or replay_size == 0:
            return "fresh"
        return "replay"

    def observe_validation_loss(self, loss: float) -> None:
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.loss_tolerance:
            self.fraction = min(self.fraction + self.fraction_step, 1.0)
            self.reference_loss = loss

    def state_dict(self) -> dict[str, float]:
        return {"fraction": self.fraction, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.fraction = float(state["fraction"])
        self.reference_loss = state.get("reference_loss")


class OnPolicyDistillModule(OnlineTeacherDistillModule):
    """Word-level KD against an online teacher on a mix of teacher text and student samples.

    Args:
        student, teacher, loss_terms, optimizer, scheduler, loss_chunk_size: as for
            :class:`~kd_lightning.modules.teacher.OnlineTeacherDistillModule`.
        tokenizer: gives the EOS and pad ids (and decodes held-out generations).
        student_data: which batches are student samples (:class:`FixedStudentData`,
            :class:`AdaptiveStudentData`).
        generation_temperature: sampling temperature of the student's responses (not the distillation
            temperature of the loss terms).
        max_new_tokens: response length cap.
        seed: of the per-step batch-source draws and samples (a resumed run makes the same choices).
        eval_generation_limit, eval_max_new_tokens: held-out generation at validation (``val/rouge_l``,
            ``val/reverse_kl``), as for every module (:class:`~kd_lightning.modules.base.StudentModule`).
        **settings: the other :class:`~kd_lightning.modules.distill.DistillModule` settings
            (``shard_teacher``, ``fuse_sparse_terms``, ...).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        tokenizer: Any,
        student_data: StudentDataSchedule,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        generation_temperature: float = 1.0,
        max_new_tokens: int = 128,
        seed: int = 0,
        loss_chunk_size: int | None = None,
        eval_generation_limit: int = 16,
        eval_max_new_tokens: int = 64,
        **settings: Any,
    ) -> None:
        super().__init__(
            student,
            teacher,
            loss_terms,
            optimizer,
            scheduler,
            loss_chunk_size,
            tokenizer=tokenizer,
            seed=seed,
            eval_generation_limit=eval_generation_limit,
            eval_max_new_tokens=eval_max_new_tokens,
            **settings,
        )
        if generation_temperature <= 0 or max_new_tokens < 1:
            raise ValueError("generation_temperature must be > 0 and max_new_tokens >= 1")
        on_student = [n for n, t in loss_terms.items() if getattr(t, "kd_target", None) == "teacher"]
        if not on_student:
            raise ValueError(
                "on-policy KD needs a term that compares the student with the online teacher on its own samples, "
                "e.g. loss=[generalized_jsd] kd_target=teacher"
            )
        self.require_special_ids("sampling the student")
        self.student_data = student_data
        self.generation_temperature = float(generation_temperature)
        self.max_new_tokens = int(max_new_tokens)
        self.replay: list[TextBatch] = []
        self._on_student_samples = False

    def batch_source(self) -> str:
        step = int(self.global_step)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        draw = random.Random(self.step_seed("batch_source")).random()
        return self.student_data.choose(step, total, draw, len(self.replay))

    def rollout_seed(self, batch_idx: int = 0) -> int:
        """The seed of this micro-batch's rollouts: the step's, distinct per rank and per accumulated
        micro-batch (their prompts differ, and so must their draws); the step's own on one process."""
        trainer = self._trainer
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        return self.rank_seed("student_samples") + 104_729 * (batch_idx % accumulate)

    def student_samples(self, batch: TextBatch, batch_idx: int = 0) -> TextBatch:
        """Fresh student responses to the batch's prompts, as a batch (and pushed to the replay buffer)."""
        generator = torch.Generator(device=self.device).manual_seed(self.rollout_seed(batch_idx))
        rollout = sample_rollouts(
            self.student,
            prompts_from_batch(batch),
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generation_temperature=self.generation_temperature,
            generator=generator,
        )
        sampled = rollout.as_batch()
        if self.student_data.replay_capacity:
            self.replay.append(sampled.to("cpu"))
            del self.replay[: max(len(self.replay) - self.student_data.replay_capacity, 0)]
        return sampled

    def training_step(self, batch: TextBatch, batch_idx: int) -> torch.Tensor:
        source = self.batch_source()
        with self.timed("rollout_seconds", len(batch)):
            if source == "fresh":
                batch = self.student_samples(batch, batch_idx)
            elif source == "replay":
                pick = random.Random(self.step_seed("replay")).randrange(len(self.replay))
                batch = self.replay[pick].to(self.device)
        self.log("train/student_data", float(source != "teacher_text"), batch_size=batch.num_records)
        self._on_student_samples = source != "teacher_text"
        try:
            with self.timed("update_seconds", len(batch)):
                return super().training_step(batch, batch_idx)
        finally:
            self._on_student_samples = False

    def active_terms(self) -> Mapping[str, LossTerm]:
        if not self._on_student_samples:
            return self.loss_terms
        return {n: t for n, t in self.loss_terms.items() if getattr(t, "kd_target", None) == "teacher"}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        nll = self.trainer.callback_metrics.get("val/nll") if self._trainer is not None else None
        if nll is not None:
            self.student_data.observe_validation_loss(float(nll))
            self.log("train/student_data_fraction", float(getattr(self.student_data, "fraction", 0.0)))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["student_data_schedule"] = self.student_data.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "student_data_schedule" in checkpoint:
            self.student_data.load_state_dict(checkpoint["student_data_schedule"])
