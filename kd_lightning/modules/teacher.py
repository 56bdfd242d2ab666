"""White-box distillation with an online teacher run inside the training step (``module=online_teacher``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kd_lightning.losses.terms import LossTerm
from kd_lightning.modules.distill import DistillModule


class OnlineTeacherDistillModule(DistillModule):
    """A :class:`DistillModule` that requires a teacher; its packed batch carries the teacher's logits.

    The teacher is frozen, held outside the module tree (never in the optimizer, the checkpoint or DDP's
    gradient sync), kept in eval mode, run under ``torch.no_grad()`` at target positions only, and moved
    to the student's device when fitting starts. Under a sharding strategy (FSDP / model parallel) its
    weights are sharded over the ranks too; under DDP each rank holds a copy (``shard_teacher`` forces
    either). Divergence terms with ``kd_target: teacher`` read its logits.

    Args:
        student: the model being trained.
        teacher: a causal LM sharing the student's vocabulary (same ``config.vocab_size``).
        loss_terms, optimizer, scheduler, loss_chunk_size: as for :class:`DistillModule`.
        shard_teacher: shard the teacher over the ranks; None = when the strategy shards the student.
        **settings: the other :class:`DistillModule` settings (tokenizer, seed, eval_generation_limit ...).
    """

    needs_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_chunk_size: int | None = None,
        shard_teacher: bool | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(
            student,
            loss_terms,
            optimizer,
            scheduler,
            loss_chunk_size,
            teacher=teacher,
            shard_teacher=shard_teacher,
            **settings,
        )
