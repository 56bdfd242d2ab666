"""What each rank of a data-parallel run draws and weighs, so N ranks take one process's step.

Under DDP every rank computes means over its own share of the global batch and DDP averages the gradients;
with shares of unequal size (answers of unequal length, texts of unequal length) that average is not the
global batch's mean unless each rank's mean is weighed by its share. Rollouts must differ between ranks
(their prompts do), so each rank draws from its own seed.
"""

from __future__ import annotations

import torch


class RankShares:
    """Mixed into :class:`~kd_lightning.modules.base.StudentModule` (a LightningModule: ``_trainer``,
    ``all_gather`` and ``step_seed`` come from it)."""

    def trainer_world_size(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def rank_seed(self, stream: str) -> int:
        """The step's seed of ``stream`` on this rank: ranks sample for different prompts, so their draws must
        differ; rank 0's is the step's own (one process draws as it always did)."""
        rank = int(self.trainer.global_rank) if self._trainer is not None else 0
        return self.step_seed(stream) + 7_919 * rank

    def rank_token_scale(self, tokens: torch.Tensor) -> torch.Tensor | float:
        """Weight of this rank's mean over its ``tokens`` (target tokens, pairs) so that the mean over ranks
        (DDP's gradient average, ``sync_dist``) is the mean over every rank's: ``W · n_r / Σ n`` (1 on a single
        process). DistillModule weights its logged figures by it (its gradient: :meth:`token_sum`); GAD its
        losses, whose several backward passes per step DDP averages one by one."""
        world = self.trainer_world_size()
        if world == 1:
            return 1.0
        total = self.all_gather(tokens.detach()).sum().clamp_min(1.0)
        return tokens.detach() * world / total

    def rank_total(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (itself on one process): a statistic of the global batch, e.g. the
        mean and variance MiniLLM whitens its advantages by."""
        if self.trainer_world_size() == 1:
            return value
        return self.all_gather(value.detach()).sum(0)
