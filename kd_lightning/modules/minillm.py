"""MiniLLM: distil a white-box teacher by minimising reverse KL with a policy gradient (arXiv 2306.08543).

Each training step (Algorithm 1 of the paper):

1. take the prompts of a batch of teacher text and sample one response each from the teacher-mixed policy
   p̃ = α·p + (1 − α)·q (:func:`~kd_lightning.rollout.sample_rollouts`, KV-cached, student in
   eval mode);
2. score it: per-token rewards ``log p(y_t) − log q(y_t)`` (scaled, clipped), future returns
   ``R_{t+1}`` (discounted, length-normalised), importance weights ``w_t = q/p̃``;
3. run ``ppo_epochs`` optimizer updates on that rollout, each minimising
   ``single_step_weight · L_single + long_term_weight · L_long + pt_loss_weight · L_PT`` where
   ``L_single`` is the exact-sum reverse KL per position, ``L_long`` PPO's clipped surrogate on the returns,
   and ``L_PT`` the LM loss on the batch's teacher text (keeps the student a language model).

Where the reference code (microsoft/LMOps ``minillm/``) differs from the paper, the paper is the default
and the reference behaviour is a setting: the reference's returns include the current token's reward and
are whitened (``include_current_reward``, ``whiten_advantages``); its single-step term is not importance
weighted (``single_step_importance_weighted=False``); it clips ``ρ·w`` together (we clip ρ alone).

The student should start from SFT (``init_from`` in the pipeline); the checkpoint is picked by validation
ROUGE-L (``val/rouge_l``, logged by :class:`~kd_lightning.modules.base.StudentModule` from greedy
generations on held-out prompts, with the reverse KL to the teacher of the student's samples).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from kd_lightning.data.batch import TextBatch
from kd_lightning.losses import policy as P
from kd_lightning.losses.functional import hard_cross_entropy, masked_mean
from kd_lightning.models.forward import target_position_logits
from kd_lightning.modules.base import StudentModule
from kd_lightning.rollout import Rollout, prompts_from_batch, response_logits, sample_rollouts


class MiniLLMModule(StudentModule):
    """Reverse-KL policy-gradient distillation (MiniLLM). Settings default to the paper's.

    Optimisation is manual (``ppo_epochs`` updates per rollout), so ``trainer.max_steps`` counts updates and
    gradient clipping is this module's ``max_grad_norm`` (the trainer's ``gradient_clip_val`` must be unset).

    Args:
        student, teacher, tokenizer, eval_generation_limit, eval_max_new_tokens, seed: see
            :class:`~kd_lightning.modules.base.StudentModule` (validation logs ``val/rouge_l``, which picks
            the checkpoint, and ``val/reverse_kl``).
        max_new_tokens: rollout length cap.
        optimizer: partial taking ``params``; scheduler: optional partial taking ``optimizer`` (stepped per update).
        teacher_mix_alpha: α, the teacher's share of the sampling distribution (paper: 0.2).
        generation_temperature: sampling temperature of rollouts (paper: 1.0).
        ppo_epochs: optimizer updates per rollout batch (reference: 4).
        ppo_clip: ε of PPO's ratio clipping (0.2).
        discount: γ of the future returns (1.0: undiscounted, as in the paper).
        length_normalize: divide returns by the number of future tokens (``R^Norm``, paper: on).
        reward_scale: rewards are divided by it before clipping.
        reward_clip: rewards are clipped to ±this (None: off). The reference uses 100 with scale 1.
        importance_weight_max: cap on ``w_t = q/p̃`` (None: uncapped).
        single_step_importance_weighted: weight the single-step term by ``w_t`` (paper) or not (reference).
        include_current_reward: add ``r_t`` to the return of position t (reference) — the single-step term
            already covers it in the paper's decomposition.
        whiten_advantages: normalise returns over the batch (reference).
        single_step_weight, long_term_weight, pt_loss_weight: weights of L_single, L_long and L_PT.
        max_grad_norm: gradient-norm clip of each update (None: off).
    """

    needs_teacher = True
    takes_loss_terms = False  # its own objective: the stage refuses loss terms other than hard_ce
    restores_best_checkpoint = True
    runs_under_fsdp = False  # several PPO updates per rollout (FSDP1 asserted on an H200)
    trainer_overrides: ClassVar[Mapping[str, Any]] = {
        "gradient_clip_val": None
    }  # clipped here (max_grad_norm)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        tokenizer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        teacher_mix_alpha: float = 0.2,
        generation_temperature: float = 1.0,
        max_new_tokens: int = 128,
        ppo_epochs: int = 4,
        ppo_clip: float = 0.2,
        discount: float = 1.0,
        length_normalize: bool = True,
        reward_scale: float = 1.0,
        reward_clip: float | None = 100.0,
        importance_weight_max: float | None = None,
        single_step_importance_weighted: bool = True,
        include_current_reward: bool = False,
        whiten_advantages: bool = False,
        single_step_weight: float = 1.0,
        long_term_weight: float = 1.0,
        pt_loss_weight: float = 1.0,
        max_grad_norm: float | None = 1.0,
        eval_generation_limit: int = 16,
        eval_max_new_tokens: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(
            student,
            optimizer,
            scheduler,
            teacher=teacher,
            tokenizer=tokenizer,
            seed=seed,
            eval_generation_limit=eval_generation_limit,
            eval_max_new_tokens=eval_max_new_tokens,
        )
        self.require_special_ids("sampling rollouts")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        if min(single_step_weight, long_term_weight, pt_loss_weight) < 0:
            raise ValueError("single_step_weight, long_term_weight and pt_loss_weight must be >= 0")
        if not 0.0 <= teacher_mix_alpha <= 1.0:
            raise ValueError(f"teacher_mix_alpha must be in [0, 1], got {teacher_mix_alpha}")
        for name, value in (
            ("ppo_clip", ppo_clip),
            ("generation_temperature", generation_temperature),
            ("reward_scale", reward_scale),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.automatic_optimization = False  # several PPO updates per rollout
        self.teacher_mix_alpha = float(teacher_mix_alpha)
        self.generation_temperature = float(generation_temperature)
        self.ppo_epochs = int(ppo_epochs)
        self.ppo_clip = float(ppo_clip)
        self.discount = float(discount)
        self.length_normalize = bool(length_normalize)
        self.reward_scale = float(reward_scale)
        self.reward_clip = reward_clip
        self.importance_weight_max = importance_weight_max
        self.single_step_importance_weighted = bool(single_step_importance_weighted)
        self.include_current_reward = bool(include_current_reward)
        self.whiten_advantages = bool(whiten_advantages)
        self.single_step_weight = float(single_step_weight)
        self.long_term_weight = float(long_term_weight)
        self.pt_loss_weight = float(pt_loss_weight)
        self.max_grad_norm = max_grad_norm

    def configure_callbacks(self):
        """Keep the checkpoint with the best validation ROUGE-L (the paper's model selection) and ``last``."""
        if not self.eval_generation_limit or self._trainer is None:
            return []
        return [
            ModelCheckpoint(
                dirpath=str(Path(self.trainer.default_root_dir) / "checkpoints"),
                filename="best-rouge_l-{step}",
                monitor="val/rouge_l",
                mode="max",
                save_top_k=1,
                save_last=True,
            )
        ]

    def rollout(self, batch: TextBatch, keep_teacher_logits: bool = True) -> Rollout:
        """Sample one response per prompt from the teacher-mixed policy (seeded by the step and the rank:
        resumable, and each rank draws its own)."""
        generator = torch.Generator(device=self.device).manual_seed(self.rank_seed("rollout"))
        return sample_rollouts(
            self.student,
            prompts_from_batch(batch),
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            teacher=self.teacher,
            teacher_mix_alpha=self.teacher_mix_alpha,
            generation_temperature=self.generation_temperature,
            keep_teacher_logits=keep_teacher_logits,
            generator=generator,
        )

    def score(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Rewards, returns (advantages) and importance weights of a rollout, all (B, T) and detached."""
        mask = rollout.response_mask
        rewards = P.token_rewards(
            rollout.teacher_logprobs, rollout.student_logprobs, mask, self.reward_scale, self.reward_clip
        )
        returns = P.future_returns(
            rewards, mask, self.discount, self.length_normalize, include_current=self.include_current_reward
        )
        if self.whiten_advantages:  # by the global batch's statistics under DDP
            returns = P.whiten(returns, mask, self.rank_total)
        weights = P.importance_weights(
            rollout.student_logprobs, rollout.sampling_logprobs, mask, self.importance_weight_max
        )
        return {"rewards": rewards, "advantages": returns.detach(), "weights": weights.detach()}

    def policy_losses(self, rollout: Rollout, scored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """L_single, L_long (and the clipped share) of the current student on a scored rollout."""
        mask = rollout.response_mask
        logits = response_logits(self.student, rollout)
        logprobs = P.gather_log_probs(logits, rollout.response_ids)
        long_term, clipped = P.ppo_clipped_surrogate(
            logprobs, rollout.student_logprobs, scored["advantages"], scored["weights"], mask, self.ppo_clip
        )
        weights = scored["weights"] if self.single_step_importance_weighted else None
        single = P.single_step_reverse_kl(logits, rollout.teacher_logits, mask, weights)
        return {"single_step": single, "long_term": long_term, "clip_share": clipped}

    def training_step(self, batch: TextBatch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        with self.timed("rollout_seconds", len(batch)):
            rollout = self.rollout(batch)
            scored = self.score(rollout)
        with self.timed("update_seconds", len(batch)):
            losses, pt, total = self.policy_updates(batch, rollout, scored, optimizer, scheduler)
        mask = rollout.response_mask
        with torch.no_grad():
            sequence_reward = (scored["rewards"].sum(-1) / rollout.lengths.clamp_min(1)).mean()
        logs = {
            "train/loss": total.detach(),
            "train/single_step": losses["single_step"].detach(),
            "train/long_term": losses["long_term"].detach(),
            "train/pt_loss": pt.detach(),
            "train/clip_share": losses["clip_share"],
            "train/reward": sequence_reward,
            "train/importance_weight": masked_mean(scored["weights"], mask),
            "train/response_tokens": rollout.lengths.float().mean(),
        }
        for name, value in logs.items():
            self.log(
                name, value, batch_size=batch.num_records, prog_bar=name in ("train/loss", "train/reward")
            )

    def policy_updates(self, batch: TextBatch, rollout: Rollout, scored, optimizer, scheduler):
        """``ppo_epochs`` optimizer updates on one scored rollout; the last update's losses.

        Under DDP each rank's token means weigh by its share of the tokens (answer tokens for the policy
        terms, text tokens for the pre-training term), so the ranks' average gradient is the global batch's
        (exact with answers of unequal length)."""
        answer_share = self.rank_token_scale(rollout.response_mask.sum().float())
        text_share = (
            self.rank_token_scale(batch.target_mask.sum().float()) if self.pt_loss_weight > 0 else 1.0
        )
        for _ in range(self.ppo_epochs):
            losses = self.policy_losses(rollout, scored)
            pt = (
                hard_cross_entropy(*self._packed_text_logits(batch))
                if self.pt_loss_weight > 0
                else torch.zeros((), device=self.device)
            )
            total = (
                self.single_step_weight * losses["single_step"]
                + self.long_term_weight * losses["long_term"]
                + self.pt_loss_weight * pt
            )
            optimizer.zero_grad()
            self.manual_backward(
                (
                    self.single_step_weight * losses["single_step"]
                    + self.long_term_weight * losses["long_term"]
                )
                * answer_share
                + self.pt_loss_weight * pt * text_share
            )
            if self.max_grad_norm is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return losses, pt, total

    def _packed_text_logits(self, batch: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.target_mask
        logits = target_position_logits(
            self.student, batch.input_ids, batch.attention_mask, mask, batch.position_ids
        )
        return logits[None], batch.target_ids[mask][None]
