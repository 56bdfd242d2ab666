"""DistillModule: a student trained on a weighted sum of loss terms.

The total is ``sum(term.weight * term(student_logits, batch))``. Each term is logged unweighted under its
name (``train/hard_ce``, ``train/prior_kl`` ...) together with ``train/loss``. Subclasses add terms by
overriding :meth:`extra_terms` (e.g. a feature loss that needs hidden states) or change how the student is
run by overriding :meth:`student_logits`. Loss terms receive logits (1, N, V) for the N target positions
of the batch and the batch packed alike (see :meth:`student_logits`).

Plain SFT (proxy alignment, SeqKD) is this module with the single term ``hard_ce``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from lightning import LightningModule
from torch import nn

from kd_lightning.losses.chunked import chunked_terms
from kd_lightning.losses.functional import IGNORE_INDEX, token_cross_entropy
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_terms
from kd_lightning.losses.terms import LossTerm, soft_label_names
from kd_lightning.models.loading import target_position_logits, target_position_states


class DistillModule(LightningModule):
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
    """

    def __init__(
        self,
        student: nn.Module,
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        loss_chunk_size: int | None = None,
        fuse_sparse_terms: bool = True,
    ) -> None:
        super().__init__()
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size must be >= 1 (or None for the plain path), got {loss_chunk_size}"
            )
        if not loss_terms:
            raise ValueError("DistillModule needs at least one loss term (e.g. loss=[hard_ce])")
        # No save_hyperparameters(): every argument is an object (models, terms, factories), and Lightning's
        # frame inspection would also capture a subclass's teacher into the checkpoint. The CLI logs the
        # resolved config to every logger instead.
        self.student = student
        self.loss_terms = nn.ModuleDict(dict(loss_terms))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_chunk_size = loss_chunk_size
        self.fuse_sparse_terms = fuse_sparse_terms
        self.setup_terms(student, None)

    def setup_terms(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Let terms size their own parameters (e.g. a feature projection) to the models."""
        for term in self.loss_terms.values():
            term.setup(student, teacher)

    @property
    def student_hidden_layers(self) -> tuple[int, ...]:
        """Student hidden-state layers the terms read (packed as ``student_hidden_<layer>``)."""
        return tuple(sorted({i for t in self.loss_terms.values() for i in getattr(t, "student_layers", ())}))

    @property
    def soft_label_names(self) -> tuple[str, ...]:
        """The soft-label stores the terms read (the DataModule must supply them)."""
        return soft_label_names(self.loss_terms.values())

    def student_logits(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits at the target positions only, and the batch packed the same way.

        Returns logits (1, N, V) for the N target positions of the batch and a batch whose per-position
        fields (``target_ids``, soft labels) are packed to (1, N, ...), so every loss term sees aligned
        tensors and no compute is spent on prompt or padding positions.
        """
        mask = batch["target_ids"] != IGNORE_INDEX
        layers = self.student_hidden_layers
        if not layers:
            logits = target_position_logits(self.student, batch["input_ids"], batch["attention_mask"], mask)
            return logits.unsqueeze(0), self.targets(batch, mask)
        logits, hidden = target_position_states(
            self.student, batch["input_ids"], batch["attention_mask"], mask, layers
        )
        packed = self.targets(batch, mask)
        packed.update({f"student_hidden_{layer}": h.unsqueeze(0) for layer, h in hidden.items()})
        return logits.unsqueeze(0), packed

    def targets(self, batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-position fields of ``batch`` at ``mask`` (B, T), packed to (1, N, ...).

        Hook: a subclass adds targets computed in the step (e.g. an online teacher's logits).
        """
        return {
            key: value[mask].unsqueeze(0)
            for key, value in batch.items()
            if key not in ("input_ids", "attention_mask")
            and value.dim() >= 2
            and value.shape[:2] == mask.shape
        }

    def student_hidden(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final hidden states (N, H) at the target positions, and the packed batch (fused path)."""
        mask = batch["target_ids"] != IGNORE_INDEX
        if not hasattr(self.student, "get_decoder"):
            raise TypeError(
                "loss_chunk_size needs a model with get_decoder()/get_output_embeddings() (an HF causal LM)"
            )
        last, hidden = target_position_states(
            self.student,
            batch["input_ids"],
            batch["attention_mask"],
            mask,
            self.student_hidden_layers,
            head=False,
        )
        packed = self.targets(batch, mask)
        packed.update({f"student_hidden_{layer}": h.unsqueeze(0) for layer, h in hidden.items()})
        return last, packed

    def extra_terms(
        self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Hook: return ``{name: (weight, value)}`` for terms that need more than logits and the batch."""
        return {}

    def active_terms(self) -> Mapping[str, LossTerm]:
        """Hook: the terms of this step (all by default; on-policy modules drop text-only terms on samples)."""
        return self.loss_terms

    def compute_terms(
        self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        fused = self.fused_values(student_logits, batch)
        terms = {
            name: (term.weight, fused[name] if name in fused else term(student_logits, batch))
            for name, term in self.active_terms().items()
        }
        terms.update(self.extra_terms(student_logits, batch))
        return terms

    def fused_values(
        self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Values of the terms that share one pass over the logits (empty when fewer than two qualify)."""
        if not self.fuse_sparse_terms:
            return {}
        vocab = student_logits.shape[-1]
        group = {n: t for n, t in self.active_terms().items() if t.reads_logits and fusable(t, batch, vocab)}
        return fused_sparse_terms(student_logits, group, batch) if len(group) >= 2 else {}

    def on_fit_start(self) -> None:
        self.student.train()  # HF from_pretrained returns eval mode; Lightning no longer flips it

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
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
        total = sum(weight * value for weight, value in terms.values())
        batch_size = batch["input_ids"].shape[0]
        tokens = (batch["target_ids"] != IGNORE_INDEX).sum().float()
        scale, distributed = self.rank_token_scale(tokens), self.trainer_world_size() > 1
        for name, (_, value) in terms.items():
            self.log(f"train/{name}", value.detach() * scale, batch_size=batch_size, sync_dist=distributed)
        self.log(
            "train/loss", total.detach() * scale, prog_bar=True, batch_size=batch_size, sync_dist=distributed
        )
        self.log("train/target_tokens", tokens, reduce_fx="sum", batch_size=batch_size)
        return total * scale

    def trainer_world_size(self) -> int:
        trainer = self._trainer
        return int(trainer.world_size) if trainer is not None else 1

    def rank_token_scale(self, tokens: torch.Tensor) -> torch.Tensor | float:
        """Weight of this rank's token-mean loss so that DDP's gradient average is the global token mean.

        Each term is a mean over this rank's target tokens n_r. DDP averages gradients over W ranks, which
        would weight every rank alike however many tokens it holds. Scaling by ``W · n_r / Σ n`` makes the
        average exactly the gradient of the mean over all ranks' tokens, i.e. what one process computes on
        the global batch. 1 on a single process.
        """
        world = self.trainer_world_size()
        if world == 1:
            return 1.0
        total = self.all_gather(tokens.detach()).sum().clamp_min(1.0)
        return tokens.detach() * world / total

    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        logits, packed = self.student_logits(batch)
        self._val_nll += token_cross_entropy(logits, packed["target_ids"]).sum().double()
        self._val_tokens += packed["target_ids"].numel()

    def on_validation_epoch_end(self) -> None:
        nll_sum = self.all_gather(self._val_nll).sum()
        tokens = self.all_gather(self._val_tokens).sum().clamp_min(1.0)
        nll = (nll_sum / tokens).float()
        self.log("val/nll", nll, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(nll), sync_dist=False)

    def configure_optimizers(self):
        # the student and any trainable term parameters (a feature projection); the teacher is not a submodule
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
