"""GAD: Generative Adversarial Distillation of a black-box teacher (arXiv 2511.10643).

The teacher is seen only through its answers. A discriminator D (a causal LM with a scalar head,
:class:`~kd_lightning.models.discriminator.SequenceScorer`) learns to tell the teacher's answer to a prompt
from the student's, by the Bradley–Terry loss ``−log σ(D(x, y_teacher) − D(x, y_student))``; the student
samples G answers per prompt and is trained by policy gradient to make D score them high: rewards are D's
scores, advantages are normalised within each prompt's group (GRPO), the update is PPO's clipped surrogate,
with an optional KL to the student it started from. D is updated on the same step's pairs.

The paper's two warm-up stages: the generator starts from SFT on the teacher's text (in ``kdl pipeline``, a
variant with ``init_from`` the SFT student), and for ``warmup_steps`` steps only D trains, on teacher
answers against the warm generator's samples, before the adversarial stage begins. Every run saves D beside
its student (``<student>/discriminator``); a run that starts from such a student (``init_from``) continues its
D. So the D warm-up is an artifact of its own when it is a variant of its own (``warmup_steps`` = its
``trainer.max_steps``: the student is not updated), cached and shared by every adversarial variant that
starts from it (``warmup_steps: 0``), as ``experiment=blackbox_compare`` does.

D compares like with like: the teacher's answer is cut as the student's samples are (its first
``max_new_tokens`` tokens, and nothing after its end token, where sampling stops). Against the full
answer, D would tell the two apart by length alone (a 400-token answer against a 96-token sample), and the
student's reward would be for running to the budget, not for answering like the teacher. Logged per step:
``train/reward`` (mean) and ``train/reward_std``, ``train/pair_accuracy`` (D's, on the step's pairs),
``train/answer_tokens`` (length hacking shows here), ``train/kl_to_start``; at validation
``val/pair_accuracy`` on held-out prompts.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kd_lightning.data.batch import IGNORE_INDEX, TextBatch
from kd_lightning.losses import policy as P
from kd_lightning.losses.adversarial import bradley_terry_loss, group_advantages, k3_kl, pair_accuracy
from kd_lightning.losses.functional import masked_mean
from kd_lightning.models.discriminator import SequenceScorer
from kd_lightning.models.loading import freeze
from kd_lightning.modules.base import StudentModule
from kd_lightning.rollout import Rollout, prompts_from_batch, response_logits, sample_rollouts

log = logging.getLogger(__name__)

DISCRIMINATOR_FOLDER = "discriminator"
"""Where a GAD run saves D inside its student's folder (HF backbone + ``score_head.safetensors``)."""


def teacher_answers_within(
    batch: TextBatch, max_answer_tokens: int, end_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (right-padded) teacher rows of ``batch`` as the student's samples of their prompts would hold
    them: ``(input_ids, attention_mask)``, (B, W) with W the longest kept row.

    The prompt ends at a row's first target position (as :func:`~kd_lightning.rollout.prompts_from_batch`
    reads it); the answer is kept to its first ``max_answer_tokens`` tokens and, with ``end_token_id``, up to
    and including its first end token (a chat template's answer goes on after it, e.g. ``<|im_end|>`` then a
    newline, where sampling stops).
    """
    targets = batch.target_ids != IGNORE_INDEX
    if not bool(targets.any(-1).all()):
        raise ValueError("a batch row has no response tokens, so its answer cannot be located")
    columns = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    answer_start = targets.float().argmax(-1) + 1  # (B,)
    keep = answer_start + max_answer_tokens  # (B,) the prompt and the kept answer
    if end_token_id is not None:
        ends = (batch.input_ids == end_token_id) & (columns[None] >= answer_start[:, None])
        first_end = torch.where(ends, columns[None], batch.input_ids.shape[1]).min(-1).values
        keep = torch.minimum(keep, first_end + 1)
    mask = batch.attention_mask.bool() & (columns[None] < keep[:, None])
    width = int((mask.long() * (columns[None] + 1)).max())
    return batch.input_ids[:, :width], mask[:, :width].to(batch.attention_mask.dtype)


def rollout_rows(rollout: Rollout, rows: slice) -> Rollout:
    """The rollout's ``rows``, without the left-padding columns none of them uses (a prompt's G answers
    share its length, so a pass over whole groups of one prompt carries no padding)."""
    used = rollout.attention_mask[rows].bool().any(0)
    first = min(int(used.long().argmax()), rollout.prompt_width)
    return replace(
        rollout,
        input_ids=rollout.input_ids[rows, first:],
        attention_mask=rollout.attention_mask[rows, first:],
        prompt_width=rollout.prompt_width - first,
        **{
            f.name: getattr(rollout, f.name)[rows]
            for f in fields(Rollout)
            if f.name not in ("input_ids", "attention_mask", "prompt_width")
            and getattr(rollout, f.name) is not None
        },
    )


def trimmed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows without the leading and trailing columns that are padding in all of them."""
    used = attention_mask.bool().any(0).nonzero().flatten()
    if not len(used):
        return input_ids, attention_mask
    keep = slice(int(used[0]), int(used[-1]) + 1)
    return input_ids[:, keep], attention_mask[:, keep]


class GADModule(StudentModule):
    """The student as GAD's generator, and its discriminator (see the module docstring).

    Args:
        student, optimizer, scheduler, teacher, tokenizer, seed, eval_generation_limit, eval_max_new_tokens:
            see :class:`~kd_lightning.modules.base.StudentModule` (no teacher model: GAD reads the teacher's
            text only).
        discriminator: D; None builds it from a copy of the student's weights when the module is built
            (the paper's choice: the warm generator), unless ``discriminator_from`` names a saved one or the run
            starts from a GAD student's folder, whose D it continues (:meth:`load_companions`).
        discriminator_from: a folder holding a D saved by an earlier GAD run (``<its student>/discriminator``),
            e.g. a warm-up run's; excludes ``discriminator``.
        discriminator_lr: AdamW's learning rate for D.
        group_size: G, answers sampled per prompt (≥ 2: advantages are relative to the group).
        max_new_tokens, generation_temperature: of the sampled answers; D sees the teacher's answers cut to
            ``max_new_tokens`` too (:func:`teacher_answers_within`).
        warmup_steps: the first steps train D only (the paper's discriminator warm-up).
        ppo_epochs, ppo_clip: updates per batch of samples and PPO's ε.
        kl_weight: weight of the KL to the student the run started from (0: none).
        max_grad_norm: the gradient norm each update is clipped to (None: off).
        prompts_per_pass: prompts whose answers (G each) go through one forward/backward pass of the student and
            of D (None: the whole step's at once). Memory, not the result: a step's gradients are the same
            (each pass weighs by its share of the step's answer tokens or pairs), and activations kept for the
            backward fall by the number of passes (16 SmolLM2 answers of 512 tokens at once: about 20 GB).
    """

    takes_loss_terms = False  # its own objective: the stage refuses loss terms other than hard_ce
    runs_under_fsdp = False  # two optimizers and several backward passes per step
    trainer_overrides: ClassVar[Mapping[str, Any]] = {
        "gradient_clip_val": None,  # clipped here
        "ddp_find_unused_parameters": True,  # the policy's backward never reaches D, D's never the student
    }

    def __init__(
        self,
        student: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        teacher: nn.Module | None = None,
        tokenizer: Any = None,
        discriminator: nn.Module | None = None,
        discriminator_from: str | None = None,
        discriminator_lr: float = 1.0e-5,
        group_size: int = 4,
        max_new_tokens: int = 128,
        generation_temperature: float = 1.0,
        warmup_steps: int = 10,
        ppo_epochs: int = 1,
        ppo_clip: float = 0.2,
        kl_weight: float = 0.0,
        max_grad_norm: float | None = 1.0,
        prompts_per_pass: int | None = None,
        eval_generation_limit: int = 16,
        eval_max_new_tokens: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(
            student,
            optimizer,
            scheduler,
            teacher=None,  # a black-box method: the teacher is its text
            tokenizer=tokenizer,
            seed=seed,
            eval_generation_limit=eval_generation_limit,
            eval_max_new_tokens=eval_max_new_tokens,
        )
        self.require_special_ids("sampling the student's answers")
        if group_size < 2:
            raise ValueError(
                f"module.group_size must be >= 2 (advantages are relative to the group), got {group_size}"
            )
        for name, value in (("max_new_tokens", max_new_tokens), ("ppo_epochs", ppo_epochs),
                            ("prompts_per_pass", 1 if prompts_per_pass is None else prompts_per_pass)):  # fmt: skip
            if value < 1:
                raise ValueError(f"module.{name} must be >= 1, got {value}")
        for name, value in (("discriminator_lr", discriminator_lr), ("ppo_clip", ppo_clip),
                            ("generation_temperature", generation_temperature)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"module.{name} must be > 0, got {value}")
        if warmup_steps < 0 or kl_weight < 0:
            raise ValueError("module.warmup_steps and module.kl_weight must be >= 0")
        if discriminator is not None and discriminator_from:
            raise ValueError(
                "module.discriminator and module.discriminator_from both name a discriminator; keep one"
            )
        self.automatic_optimization = False
        self.discriminator_given = discriminator is not None or bool(discriminator_from)
        """D was named (a model or a saved folder): a run's ``init_from`` does not replace it."""
        if discriminator_from:
            discriminator = SequenceScorer.load(discriminator_from)
            log.info("GAD: the discriminator continues from %s", discriminator_from)
        self.discriminator = discriminator if discriminator is not None else SequenceScorer.copy_of(student)
        self.discriminator_lr = float(discriminator_lr)
        self.group_size = int(group_size)
        self.max_new_tokens = int(max_new_tokens)
        self.generation_temperature = float(generation_temperature)
        self.warmup_steps = int(warmup_steps)
        self.ppo_epochs = int(ppo_epochs)
        self.ppo_clip = float(ppo_clip)
        self.kl_weight = float(kl_weight)
        self.max_grad_norm = max_grad_norm
        self.prompts_per_pass = None if prompts_per_pass is None else int(prompts_per_pass)
        self.gad_steps = 0
        """Training steps done (warm-up and adversarial); ``trainer.max_steps`` counts optimizer updates of
        both models instead (a warm-up step is one, an adversarial step ``ppo_epochs + 1``)."""
        # the student the run starts from, frozen and outside the module tree (never checkpointed)
        object.__setattr__(self, "reference", freeze(copy.deepcopy(student)) if kl_weight > 0 else None)

    def configure_optimizers(self):
        student = self.optimizer_factory(params=[p for p in self.student.parameters() if p.requires_grad])
        discriminator = torch.optim.AdamW(self.discriminator.parameters(), lr=self.discriminator_lr)
        return [student, discriminator]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.discriminator.train()
        if self.reference is not None:
            self.reference.to(self.device).eval()

    def sample(self, batch: TextBatch, batch_idx: int, group: int) -> Rollout:
        """``group`` answers per prompt of the batch (seeded by the step and the rank: a resumed run draws the
        same answers)."""
        if batch.packed:
            raise ValueError(
                "recipe=gad compares whole teacher answers with the student's: set datamodule.packing=false"
            )
        generator = torch.Generator(device=self.device).manual_seed(self.rank_seed("rollout"))
        prompts = [prompt for prompt in prompts_from_batch(batch) for _ in range(group)]
        return sample_rollouts(
            self.student,
            prompts,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generation_temperature=self.generation_temperature,
            generator=generator,
        )

    def teacher_answers(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's teacher answers as D compares them with the student's samples (cut alike)."""
        return teacher_answers_within(batch, self.max_new_tokens, self.eos_token_id)

    def passes(self, prompts: int) -> list[slice]:
        """The prompts of a step, in the groups that go through one forward/backward pass each."""
        size = self.prompts_per_pass or prompts
        return [slice(start, min(start + size, prompts)) for start in range(0, prompts, size)]

    def policy_update(
        self, optimizer: torch.optim.Optimizer, rollout: Rollout, advantages: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One update of the student on the rollout (rows grouped by prompt, G per prompt), pass by pass;
        returns the step's policy loss, KL to the start and clipped share (token means over the step)."""
        optimizer.zero_grad()
        tokens = rollout.response_mask.sum()
        # under DDP each rank's means weigh by its share of the tokens, so the ranks' average is the global
        # batch's mean: exact with answers of unequal length
        token_share = self.rank_token_scale(tokens.float())
        found = {"policy": 0.0, "kl": 0.0, "clip_share": 0.0}
        for prompts in self.passes(len(rollout.input_ids) // self.group_size):
            rows = slice(prompts.start * self.group_size, prompts.stop * self.group_size)
            part = rollout_rows(rollout, rows)
            share = part.response_mask.sum() / tokens.clamp_min(1)  # of the step's answer tokens
            losses = self.policy_loss(part, advantages[rows])
            self.manual_backward(losses["policy"] * share * token_share)
            found = {name: found[name] + share * losses[name].detach() for name in found}
        self._clip_and_step(optimizer)
        return found

    def discriminator_update(
        self, optimizer: torch.optim.Optimizer, batch: TextBatch, rollout: Rollout, prompts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One update of D on the step's (teacher, student) pairs, pass by pass; returns the scores it gave
        (teacher (P,), student (P, G)) and its Bradley–Terry loss over the step."""
        optimizer.zero_grad()
        teacher_ids, teacher_mask = self.teacher_answers(batch)
        pair_share = self.rank_token_scale(torch.tensor(float(prompts * self.group_size), device=self.device))
        teacher_scores, student_scores, loss = [], [], torch.zeros((), device=self.device)
        for part in self.passes(prompts):
            rows = slice(part.start * self.group_size, part.stop * self.group_size)
            teacher = self.discriminator(*trimmed(teacher_ids[part], teacher_mask[part]))
            student = self.discriminator(
                *trimmed(rollout.input_ids[rows], rollout.attention_mask[rows])
            ).view(-1, self.group_size)
            share = (part.stop - part.start) / prompts  # of the step's pairs
            part_loss = bradley_terry_loss(teacher, student)
            self.manual_backward(part_loss * share * pair_share)
            teacher_scores.append(teacher.detach())
            student_scores.append(student.detach())
            loss = loss + share * part_loss.detach()
        self._clip_and_step(optimizer)
        return torch.cat(teacher_scores), torch.cat(student_scores), loss

    def policy_loss(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """PPO's clipped surrogate on the rollout (advantages (B,) per answer), and the KL to the start."""
        mask = rollout.response_mask
        logprobs = P.gather_log_probs(response_logits(self.student, rollout), rollout.response_ids)
        weights = P.importance_weights(rollout.student_logprobs, rollout.sampling_logprobs, mask, None)
        per_token = advantages.unsqueeze(-1).expand_as(logprobs)
        loss, clipped = P.ppo_clipped_surrogate(
            logprobs, rollout.student_logprobs, per_token, weights.detach(), mask, self.ppo_clip
        )
        kl = torch.zeros((), device=logprobs.device)
        if self.reference is not None:
            with torch.no_grad():
                reference = P.gather_log_probs(response_logits(self.reference, rollout), rollout.response_ids)
            kl = masked_mean(k3_kl(logprobs, reference), mask)
        return {"policy": loss + self.kl_weight * kl, "kl": kl.detach(), "clip_share": clipped}

    def training_step(self, batch: TextBatch, batch_idx: int) -> None:
        generator_optimizer, discriminator_optimizer = self.optimizers()
        prompts = len(prompts_from_batch(batch))
        with self.timed("rollout_seconds", len(batch)):
            rollout = self.sample(batch, batch_idx, self.group_size)
            with torch.no_grad():
                rewards = self.discriminator(rollout.input_ids, rollout.attention_mask).view(prompts, -1)
        adversarial = self.gad_steps >= self.warmup_steps
        losses: dict[str, torch.Tensor] = {}
        with self.timed("update_seconds", len(batch)):
            if adversarial:
                advantages = group_advantages(rewards).flatten().detach()
                for _ in range(self.ppo_epochs):
                    losses = self.policy_update(generator_optimizer, rollout, advantages)
            teacher_scores, student_scores, discriminator_loss = self.discriminator_update(
                discriminator_optimizer, batch, rollout, prompts
            )
        logs = {
            "train/discriminator_loss": discriminator_loss.detach(),
            "train/pair_accuracy": pair_accuracy(teacher_scores, student_scores),
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std(unbiased=False),
            "train/answer_tokens": rollout.lengths.float().mean(),
            "train/adversarial": torch.tensor(float(adversarial)),
            **(
                {
                    "train/policy_loss": losses["policy"].detach(),
                    "train/kl_to_start": losses["kl"],
                    "train/clip_share": losses["clip_share"],
                }
                if losses
                else {}
            ),
        }
        for name, value in logs.items():
            self.log(
                name, value, batch_size=prompts, prog_bar=name in ("train/reward", "train/pair_accuracy")
            )
        self.gad_steps += 1

    def save_companions(self, folder: Path) -> None:
        """D beside the student (a later run that starts from this student continues it)."""
        self.discriminator.save(Path(folder) / DISCRIMINATOR_FOLDER)

    def load_companions(self, folder: Path) -> None:
        """The D saved beside the student this run starts from (a warm-up run's), unless D was named."""
        saved = Path(folder) / DISCRIMINATOR_FOLDER
        if self.discriminator_given or not saved.is_dir():
            return
        self.discriminator = SequenceScorer.load(saved)
        log.info("GAD: the discriminator continues from %s (saved by the run this student comes from)", saved)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gad_steps"] = self.gad_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.gad_steps = int(checkpoint.get("gad_steps", 0))

    def _clip_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.max_grad_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()

    @torch.no_grad()
    def validation_step(self, batch: TextBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch.packed:
            return
        rollout = self.sample(batch, batch_idx, 1)
        accuracy = pair_accuracy(
            self.discriminator(*self.teacher_answers(batch)),
            self.discriminator(rollout.input_ids, rollout.attention_mask).view(len(batch), -1),
        )
        self.log("val/pair_accuracy", accuracy, batch_size=len(batch))
