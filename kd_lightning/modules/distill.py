"""DistillModule: a student trained on a weighted sum of loss terms.

The total is ``sum(term.weight * term(student_logits, batch))``. Each term is logged unweighted under its
name (``train/hard_ce``, ``train/prior_kl`` ...) together with ``train/loss``. Subclasses add terms by
overriding :meth:`extra_terms` (e.g. a feature loss that needs hidden states) or change how the student is
run by overriding :meth:`student_logits`. Loss terms receive logits (1, N, V) for the N target positions
of the batch and a :class:`~kd_lightning.data.batch.PositionBatch` packed alike (:meth:`pack_positions`).

Given a ``teacher``, the module runs it online at the target positions of every step (``teacher`` dense
logits, and the hidden states feature terms ask for); the teacher is frozen and held outside the module
tree (:class:`~kd_lightning.modules.base.StudentModule`).

Plain SFT (proxy alignment, SeqKD) is this module with the single term ``hard_ce``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kd_lightning.data.batch import PositionBatch, TextBatch
from kd_lightning.losses.chunked import chunked_terms
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_terms
from kd_lightning.losses.terms import DivergenceTerm, LossTerm, soft_label_names
from kd_lightning.models.forward import target_position_logits, target_position_states
from kd_lightning.modules.base import StudentModule
from kd_lightning.modules.schedule import KDWeightSchedule


class DistillModule(StudentModule):
    """Train ``student`` on weighted loss terms over teacher text and its soft labels.

    Args:
        student: a causal LM returning ``.logits`` (B, T, V), e.g. a Hugging Face model.
        loss_terms: name → :class:`LossTerm`; each carries its weight.
        optimizer: a partial taking ``params`` (Hydra ``_partial_: true``), built over trainable student params.
        scheduler: optional partial taking ``optimizer``; stepped every optimizer step.
        loss_chunk_size: if set, terms are computed from the student's hidden states and output head in
            chunks of this many target positions (see :mod:`kd_lightning.losses.chunked`): (N, V) logits
            are never held at once. ``extra_terms`` then receives ``student_logits=None``.
        fuse_sparse_terms: compute hard CE and forward KLs against sparse stores in one pass over the logits
            (:mod:`kd_lightning.losses.fused_sparse`; same values and gradients, far less memory traffic).
        teacher, tokenizer, seed, eval_generation_limit, eval_max_new_tokens, shard_teacher: see
            :class:`~kd_lightning.modules.base.StudentModule`. A teacher is run online in every step.
        kd_weight_schedule: scales every divergence term's weight over training
            (:class:`~kd_lightning.modules.schedule.KDWeightSchedule`; constant by default).
    """

    reads_served_teacher = True  # its divergence terms read a server's top-k rows (teacher=served)

    def __init__(
        self,
        student: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_chunk_size: int | None = None,
        fuse_sparse_terms: bool = True,
        teacher: nn.Module | None = None,
        tokenizer: Any = None,
        seed: int = 0,
        eval_generation_limit: int = 0,
        eval_max_new_tokens: int = 64,
        shard_teacher: bool | None = None,
        kd_weight_schedule: KDWeightSchedule | None = None,
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
            shard_teacher=shard_teacher,
        )
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size must be >= 1 (or None for the plain path), got {loss_chunk_size}"
            )
        if not loss_terms:
            raise ValueError(f"{type(self).__name__} needs at least one loss term (e.g. loss=[hard_ce])")
        self.loss_terms = nn.ModuleDict(dict(loss_terms))
        self.loss_chunk_size = loss_chunk_size
        self.fuse_sparse_terms = fuse_sparse_terms
        self.kd_weight_schedule = kd_weight_schedule or KDWeightSchedule()
        self.setup_terms(student, self.teacher)

    def setup_terms(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Let terms size their own parameters (e.g. a feature projection) to the models."""
        for term in self.loss_terms.values():
            term.setup(student, teacher)

    @property
    def student_hidden_layers(self) -> tuple[int, ...]:
        """Student hidden-state layers the terms read (``PositionBatch.student_hidden``)."""
        return tuple(sorted({i for t in self.loss_terms.values() for i in getattr(t, "student_layers", ())}))

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...]:
        """Teacher hidden-state layers the terms read (``PositionBatch.teacher_hidden``)."""
        return tuple(sorted({i for t in self.loss_terms.values() for i in getattr(t, "teacher_layers", ())}))

    @property
    def soft_label_names(self) -> tuple[str, ...]:
        """The soft-label stores the terms read (the DataModule must supply them)."""
        return soft_label_names(self.loss_terms.values())

    def student_logits(self, batch: TextBatch) -> tuple[torch.Tensor, PositionBatch]:
        """Student logits at the target positions only, and the batch packed the same way.

        Returns logits (1, N, V) for the N target positions of the batch and its :class:`PositionBatch`,
        so every loss term sees aligned tensors and no compute is spent on prompt or padding positions.
        """
        mask = batch.target_mask
        layers = self.student_hidden_layers
        if not layers:
            logits = target_position_logits(
                self.student, batch.input_ids, batch.attention_mask, mask, batch.position_ids
            )
            return logits.unsqueeze(0), self.pack_positions(batch, mask)
        logits, hidden = target_position_states(
            self.student, batch.input_ids, batch.attention_mask, mask, layers, position_ids=batch.position_ids
        )
        packed = self.pack_positions(batch, mask)
        packed.student_hidden.update({layer: h.unsqueeze(0) for layer, h in hidden.items()})
        return logits.unsqueeze(0), packed

    def pack_positions(self, batch: TextBatch, mask: torch.Tensor) -> PositionBatch:
        """The batch's declared fields at ``mask`` (B, T), packed to (1, N, ...), with the online teacher's
        logits (and the hidden states terms ask for) when the module has a teacher.

        Hook: a subclass adds fields computed in the step (``PositionBatch.prepared``).
        """
        packed = PositionBatch.pack(batch, mask)
        if self.teacher is None:
            return packed
        if self.teacher_is_served:  # top-k rows over HTTP, read by the divergences as sparse rows
            packed.soft_labels["teacher"] = self.teacher.rows(
                batch.input_ids, batch.attention_mask, mask, batch.position_ids
            )
            return packed
        layers = self.teacher_hidden_layers
        with torch.no_grad():
            if layers:
                rows, hidden = target_position_states(
                    self.teacher,
                    batch.input_ids,
                    batch.attention_mask,
                    mask,
                    layers,
                    position_ids=batch.position_ids,
                )
                packed.teacher_hidden.update({layer: h.unsqueeze(0) for layer, h in hidden.items()})
            else:
                rows = target_position_logits(
                    self.teacher, batch.input_ids, batch.attention_mask, mask, batch.position_ids
                )
        packed.dense_logits["teacher"] = rows.unsqueeze(0)
        return packed

    def student_hidden(self, batch: TextBatch) -> tuple[torch.Tensor, PositionBatch]:
        """Final hidden states (N, H) at the target positions, and the packed batch (chunked path)."""
        mask = batch.target_mask
        if not hasattr(self.student, "get_decoder"):
            raise TypeError(
                "loss_chunk_size needs a model with get_decoder()/get_output_embeddings() (an HF causal LM)"
            )
        last, hidden = target_position_states(
            self.student,
            batch.input_ids,
            batch.attention_mask,
            mask,
            self.student_hidden_layers,
            head=False,
            position_ids=batch.position_ids,
        )
        packed = self.pack_positions(batch, mask)
        packed.student_hidden.update({layer: h.unsqueeze(0) for layer, h in hidden.items()})
        return last, packed

    def extra_terms(
        self, student_logits: torch.Tensor | None, batch: PositionBatch
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Hook: return ``{name: (weight, value)}`` for terms that need more than logits and the batch."""
        return {}

    def active_terms(self) -> Mapping[str, LossTerm]:
        """Hook: the terms of this step (all by default; on-policy modules drop text-only terms on samples)."""
        return self.loss_terms

    def compute_terms(
        self, student_logits: torch.Tensor, batch: PositionBatch
    ) -> dict[str, tuple[float, torch.Tensor]]:
        fused = self.fused_values(student_logits, batch)
        terms = {
            name: (term.weight, fused[name] if name in fused else term(student_logits, batch))
            for name, term in self.active_terms().items()
        }
        terms.update(self.extra_terms(student_logits, batch))
        return terms

    def fused_values(self, student_logits: torch.Tensor, batch: PositionBatch) -> dict[str, torch.Tensor]:
        """Values of the terms that share one pass over the logits (empty when fewer than two qualify)."""
        if not self.fuse_sparse_terms:
            return {}
        vocab = student_logits.shape[-1]
        group = {n: t for n, t in self.active_terms().items() if t.reads_logits and fusable(t, batch, vocab)}
        return fused_sparse_terms(student_logits, group, batch) if len(group) >= 2 else {}

    def training_step(self, batch: TextBatch, batch_idx: int) -> torch.Tensor:
        if self.loss_chunk_size:
            hidden, packed = self.student_hidden(batch)
            head = self.student.get_output_embeddings()
            active = self.active_terms()
            logit_terms = {n: t for n, t in active.items() if t.reads_logits}
            values = chunked_terms(
                hidden, head, logit_terms, packed, self.loss_chunk_size, fuse=self.fuse_sparse_terms
            )
            values.update({n: t(None, packed) for n, t in active.items() if not t.reads_logits})
            terms = {name: (term.weight, values[name]) for name, term in active.items()}
            terms.update(self.extra_terms(None, packed))
        else:
            logits, packed = self.student_logits(batch)
            terms = self.compute_terms(logits, packed)
        scale_kd = self.kd_weight_scale()
        if scale_kd != 1.0:
            scaled = {
                n for n in terms if n in self.loss_terms and isinstance(self.loss_terms[n], DivergenceTerm)
            }
            terms = {n: (w * scale_kd if n in scaled else w, v) for n, (w, v) in terms.items()}
        total = sum(weight * value for weight, value in terms.values())
        batch_size = batch.num_records
        tokens = batch.target_mask.sum().float()
        scale, distributed = self.rank_token_scale(tokens), self.trainer_world_size() > 1
        for name, (_, value) in terms.items():
            self.log(f"train/{name}", value.detach() * scale, batch_size=batch_size, sync_dist=distributed)
        self.log(
            "train/loss", total.detach() * scale, prog_bar=True, batch_size=batch_size, sync_dist=distributed
        )
        self.log("train/target_tokens", tokens, reduce_fx="sum", batch_size=batch_size)
        if self.kd_weight_schedule.kind != "constant":
            self.log("train/kd_weight_scale", scale_kd, batch_size=batch_size)
        return self.token_sum(total, tokens)  # the step's token mean: see StudentModule.token_sum

    def kd_weight_scale(self) -> float:
        """This step's factor on the divergence terms' weights (:attr:`kd_weight_schedule`)."""
        if self.kd_weight_schedule.kind == "constant" or self._trainer is None:
            return 1.0
        return self.kd_weight_schedule.factor(
            int(self.global_step), int(self.trainer.estimated_stepping_batches)
        )
