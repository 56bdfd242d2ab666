"""White-box distillation from an online teacher of *another* tokenizer (``module=foreign_teacher``).

The teacher reads each record through its own chat template and tokenizer (the batch's
``teacher_input_ids``); its logits are taken at the positions aligned with the student's target positions
(``teacher_positions``, see :mod:`kd_lightning.data.cross_tokenizer`). Its distributions are over its own
vocabulary, so only cross-vocabulary terms can compare them with the student's: ``loss=[hard_ce,uld]`` or
``loss=[hard_ce,gold_hybrid]`` (:mod:`kd_lightning.losses.cross_vocab`). Unaligned positions carry a
``teacher_aligned`` flag of False and count 0 in those terms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kd_lightning.data.batch import PositionBatch, TextBatch
from kd_lightning.data.token_alignment import match_vocabularies
from kd_lightning.losses.cross_vocab import CrossVocabularyTerm
from kd_lightning.losses.terms import LossTerm
from kd_lightning.models.forward import target_position_logits
from kd_lightning.modules.distill import DistillModule


class ForeignTeacherDistillModule(DistillModule):
    """A :class:`DistillModule` whose online teacher has its own tokenizer and vocabulary.

    Args:
        student, loss_terms, optimizer, scheduler, loss_chunk_size: as for :class:`DistillModule`.
        teacher: a causal LM of any vocabulary (frozen, outside the module tree, as for every teacher).
        teacher_tokenizer: the teacher's tokenizer (the run's teacher plan loads it once); a GOLD hybrid
            term without a vocabulary match gets one built from it and the student's ``tokenizer``.
        **settings: the other :class:`DistillModule` settings.
    """

    needs_teacher = True
    teacher_shares_vocabulary: ClassVar[bool] = False
    reads_served_teacher = False  # it runs the teacher on its own tokenization, in process

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_chunk_size: int | None = None,
        teacher_tokenizer: Any = None,
        **settings: Any,
    ) -> None:
        for name, term in loss_terms.items():
            if getattr(term, "kd_target", None) == "teacher" and not isinstance(term, CrossVocabularyTerm):
                raise ValueError(
                    f"loss term {name!r} compares distributions over one vocabulary, but this teacher has its "
                    "own; use loss=[hard_ce,uld] or loss=[hard_ce,gold_hybrid] with module=foreign_teacher"
                )
            if getattr(term, "teacher_layers", ()):
                raise ValueError(
                    f"loss term {name!r} reads the teacher's hidden states, which sit at the teacher's own "
                    "positions; feature terms need a teacher of the student's tokenizer (module=online_teacher)"
                )
        super().__init__(
            student, loss_terms, optimizer, scheduler, loss_chunk_size, teacher=teacher, **settings
        )
        if teacher_tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs teacher_tokenizer (the teacher's own tokenizer)")
        object.__setattr__(self, "teacher_tokenizer", teacher_tokenizer)  # not state: never checkpointed
        # the CLI's TeacherPlan has matched the vocabularies already; a module built in Python matches them here
        hybrid = [
            t for t in self.loss_terms.values() if hasattr(t, "set_vocabulary_match") and t.match is None
        ]
        if hybrid:
            if self.tokenizer is None:
                raise ValueError("the GOLD hybrid's vocabulary match needs the student's tokenizer")
            match = match_vocabularies(self.tokenizer, teacher_tokenizer)
            for term in hybrid:
                term.set_vocabulary_match(match)

    def pack_positions(self, batch: TextBatch, mask: torch.Tensor) -> PositionBatch:
        """The batch at ``mask`` with the teacher's logits at the aligned positions (zeros elsewhere) and
        ``teacher_aligned`` (1, N)."""
        packed = PositionBatch.pack(batch, mask)
        if batch.teacher_positions is None or batch.teacher_input_ids is None:
            raise ValueError(
                "this batch has no teacher tokenization; connect the DataModule with the teacher's view "
                "(kdl distill module=foreign_teacher does)"
            )
        t_pos = batch.teacher_positions[mask]
        aligned = t_pos >= 0
        rows = mask.nonzero()[:, 0]
        t_mask = torch.zeros_like(batch.teacher_input_ids, dtype=torch.bool)
        t_mask[rows[aligned], t_pos[aligned]] = True  # one-to-one and monotone: the same row-major order
        with torch.no_grad():
            logits = target_position_logits(
                self.teacher, batch.teacher_input_ids, batch.teacher_attention_mask, t_mask
            )
        full = logits.new_zeros((len(t_pos), logits.shape[-1]))
        full[aligned] = logits
        packed.dense_logits["teacher"] = full.unsqueeze(0)
        packed.prepared["teacher_aligned"] = aligned.unsqueeze(0)
        if self._trainer is not None and self.training:
            self.log("train/teacher_aligned", aligned.float().mean(), batch_size=batch.num_records)
        return packed
