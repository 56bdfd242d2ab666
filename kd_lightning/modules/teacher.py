"""White-box distillation with an online teacher run inside the training step."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from kd_lightning.losses.terms import LossTerm
from kd_lightning.models.loading import (
    check_same_vocabulary,
    freeze,
    shard_frozen_model,
    target_position_logits,
    target_position_states,
)
from kd_lightning.modules.distill import DistillModule


class OnlineTeacherDistillModule(DistillModule):
    """A :class:`DistillModule` whose batch also carries ``teacher_logits`` from a frozen teacher.

    The teacher is held outside the module tree (not a registered submodule), so it is never in the
    optimizer, the checkpoint or DDP's gradient synchronisation. It is frozen, kept in eval mode, run under
    ``torch.no_grad()`` at target positions only, and moved to the student's device when fitting starts.
    Divergence terms with ``target: teacher`` read its logits.

    Under a sharding strategy (FSDP / model parallel) the teacher's weights are sharded over the ranks too
    (:func:`~kd_lightning.models.loading.shard_frozen_model`); under DDP each rank holds a copy, which is
    faster while it fits. ``shard_teacher`` forces either.

    Args:
        student: the model being trained.
        teacher: a causal LM sharing the student's vocabulary (same ``config.vocab_size``).
        loss_terms, optimizer, scheduler, loss_chunk_size: as for :class:`DistillModule`.
        shard_teacher: shard the teacher over the ranks; None = when the strategy shards the student.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_chunk_size: int | None = None,
        shard_teacher: bool | None = None,
    ) -> None:
        check_same_vocabulary(student, teacher, "logit-level KD compares their distributions")
        super().__init__(student, loss_terms, optimizer, scheduler, loss_chunk_size)
        object.__setattr__(self, "teacher", freeze(teacher))  # deliberately not a submodule
        self.shard_teacher = shard_teacher
        self.setup_terms(student, self.teacher)

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...]:
        """Teacher hidden-state layers the terms read (packed as ``teacher_hidden_<layer>``)."""
        return tuple(sorted({i for t in self.loss_terms.values() for i in getattr(t, "teacher_layers", ())}))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._teacher_should_shard() and not getattr(self.teacher, "_kdl_sharded", False):
            shard_frozen_model(self.teacher, self.device.type)  # moves each rank's shard to the device
            object.__setattr__(self.teacher, "_kdl_sharded", True)
        elif not getattr(self.teacher, "_kdl_sharded", False):
            self.teacher.to(self.device)
        self.teacher.eval()

    def _teacher_should_shard(self) -> bool:
        if self.trainer_world_size() < 2:
            return False
        if self.shard_teacher is not None:
            return self.shard_teacher
        name = type(self.trainer.strategy).__name__
        return name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")

    def targets(self, batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        packed = super().targets(batch, mask)
        layers = self.teacher_hidden_layers
        with torch.no_grad():
            if layers:
                teacher_rows, hidden = target_position_states(
                    self.teacher, batch["input_ids"], batch["attention_mask"], mask, layers
                )
                packed.update({f"teacher_hidden_{layer}": h.unsqueeze(0) for layer, h in hidden.items()})
            else:
                teacher_rows = target_position_logits(
                    self.teacher, batch["input_ids"], batch["attention_mask"], mask
                )
        packed["teacher_logits"] = teacher_rows.unsqueeze(0)
        return packed
