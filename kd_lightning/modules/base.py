"""StudentModule: what every LightningModule that trains a student shares.

* the student, and the optimizer / scheduler built from partials over its trainable parameters (and any
  trainable loss-term parameters, e.g. a feature projection);
* a frozen teacher held *outside* the module tree: never in the optimizer, the checkpoint or DDP's
  gradient sync; moved to the student's device (or sharded with it under FSDP) when fitting starts;
* teacher-forced validation NLL (``val/nll``, ``val/ppl``), summed over ranks, one loop for all modules;
* held-out generation at validation (``val/rouge_l`` against the teacher text, ``val/reverse_kl`` to the
  teacher of the student's samples) for every module given ``eval_generation_limit > 0``;
* the tokenizer's EOS / pad ids, checked once; per-step seeds from one formula; step timing.

Subclasses declare, as class attributes, what the stage that builds them must know: ``needs_teacher``
(load the online teacher), ``teacher_shares_vocabulary``, ``takes_loss_terms``, ``restores_best_checkpoint``
(reload the best monitored checkpoint after fit) and ``trainer_overrides`` (settings the module needs from
the Trainer). Every module is built with the
same keywords, which the run's :class:`~kd_lightning.stages.teacher_plan.TeacherPlan` decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning import LightningModule
from torch import nn

from kd_lightning.data.batch import TextBatch
from kd_lightning.evaluation.greedy import generate_greedy
from kd_lightning.evaluation.metrics import rouge_l
from kd_lightning.evaluation.reverse_kl import sampled_reverse_kl
from kd_lightning.losses.functional import IGNORE_INDEX, token_cross_entropy
from kd_lightning.models.forward import shard_frozen_model, target_position_logits
from kd_lightning.models.loading import freeze
from kd_lightning.models.vocabulary import check_same_vocabulary, trim_teacher_padding
from kd_lightning.modules.ranks import RankShares
from kd_lightning.rollout import prompts_from_batch
from kd_lightning.teachers.rows import gives_rows

SEED_STREAMS: dict[str, tuple[int, int]] = {
    "batch_source": (1, 0),
    "student_samples": (1, 0),
    "replay": (1, 0),
    "rollout": (1_000_003, 17),
}
"""Per random stream, (step multiplier, offset) of :meth:`StudentModule.step_seed`. Seed 0 reproduces the
streams of the releases whose figures the README reports."""


class StudentModule(RankShares, LightningModule):
    """Base of every student-training module.

    Args:
        student: a causal LM returning ``.logits`` (B, T, V).
        optimizer: a partial taking ``params`` (Hydra ``_partial_: true``).
        scheduler: optional partial taking ``optimizer``; stepped every optimizer step.
        teacher: optional causal LM on the student's vocabulary; frozen, held outside the module tree.
        tokenizer: gives EOS / pad ids and decodes held-out generations; needed by generating modules.
        seed: of the per-step random streams (a resumed run makes the same draws).
        eval_generation_limit: held-out prompts generated at each validation (0: no ROUGE-L / reverse KL).
        eval_max_new_tokens: generation length at validation.
        shard_teacher: shard the teacher over the ranks; None = when the strategy shards the student.
    """

    needs_teacher: ClassVar[bool] = False
    """The stage loads the online teacher for this module even when no loss term reads it."""
    restores_best_checkpoint: ClassVar[bool] = False
    """After fit, the best checkpoint of the monitored metric is loaded back (MiniLLM: ``val/rouge_l``)."""
    trainer_overrides: ClassVar[Mapping[str, Any]] = {}
    """Trainer settings this module needs (MiniLLM clips its own updates: ``gradient_clip_val=None``), and
    ``ddp_find_unused_parameters: True`` for a module whose backward passes each reach only some of its
    parameters (GAD): kdl's trainer then runs ``strategy=ddp`` as ``ddp_find_unused_parameters_true``."""
    teacher_shares_vocabulary: ClassVar[bool] = True
    """False for a teacher of another tokenizer: the stage gives the module ``teacher_tokenizer`` and the
    DataModule the teacher's view of the corpus; the vocabularies are not required to match."""
    takes_loss_terms: ClassVar[bool] = True
    """False for a module with its own objective (MiniLLM): the stage refuses loss terms other than
    ``hard_ce`` and builds it without ``loss_terms`` and ``loss_chunk_size``."""
    reads_served_teacher: ClassVar[bool] = False
    """True for a module whose online teacher may be a server's top-k rows (``teacher=served``): its terms
    read the teacher as sparse rows (:class:`~kd_lightning.teachers.rows.ServedTeacherRows`)."""
    runs_under_fsdp: ClassVar[bool] = True
    """False for a module whose training step runs several backward passes (MiniLLM's PPO updates): FSDP
    allows one per forward of its root, so such a module refuses ``trainer=fsdp`` when fitting starts."""

    def __init__(
        self,
        student: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        teacher: nn.Module | None = None,
        tokenizer: Any = None,
        seed: int = 0,
        eval_generation_limit: int = 0,
        eval_max_new_tokens: int = 64,
        shard_teacher: bool | None = None,
    ) -> None:
        super().__init__()
        if eval_max_new_tokens < 1 or eval_generation_limit < 0:
            raise ValueError("eval_max_new_tokens must be >= 1 and eval_generation_limit >= 0")
        if self.needs_teacher and teacher is None:
            raise ValueError(
                f"{type(self).__name__} needs an online teacher: add teacher=smollm2 "
                "(or teacher=local teacher.path=<HF folder>)"
            )
        # No save_hyperparameters(): every argument is an object (models, terms, factories), and Lightning's
        # frame inspection would capture the teacher into the checkpoint. The CLI logs the resolved config.
        self.student = student
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = int(seed)
        self.shard_teacher = shard_teacher
        self.eval_generation_limit = int(eval_generation_limit)
        self.eval_max_new_tokens = int(eval_max_new_tokens)
        object.__setattr__(self, "tokenizer", tokenizer)  # not state: never checkpointed
        if gives_rows(teacher):  # a server's top-k rows: no weights here to check or move
            if not self.reads_served_teacher:
                raise ValueError(f"{type(self).__name__} cannot read a served teacher (teacher=served)")
        elif teacher is not None:
            if self.teacher_shares_vocabulary:
                trim_teacher_padding(student, teacher, tokenizer)
                check_same_vocabulary(student, teacher, "distillation compares their token distributions")
            teacher = freeze(teacher)
        object.__setattr__(self, "teacher", teacher)
        self.eos_token_id: int | None = None
        self.pad_token_id: int | None = None
        if self.eval_generation_limit:
            self.require_special_ids("held-out generation (eval_generation_limit > 0)")
        self.step_seconds: dict[str, list[float]] = {}
        """Wall time of each training step's phases (``rollout_seconds``, ``update_seconds``)."""
        self.gathered_state: dict[str, torch.Tensor] | None = None  # the full student after FSDP training
        self._window_tokens: torch.Tensor | None = None
        """Target tokens of the micro-batches since the last optimizer step (see :meth:`token_sum`)."""
        self.compile_seconds: float | None = None
        """What compiling the student cost once (``trainer.compile=true``), kept in the training record."""

    # ---------------------------------------------------------------- set-up
    def require_special_ids(self, why: str) -> None:
        """Read EOS and pad ids from the tokenizer, refusing one that lacks them."""
        tok = self.tokenizer
        if tok is None or tok.eos_token_id is None or tok.pad_token_id is None:
            raise ValueError(f"{why} needs a tokenizer with eos_token_id and pad_token_id")
        self.eos_token_id, self.pad_token_id = int(tok.eos_token_id), int(tok.pad_token_id)

    # ---------------------------------------------------------------- models trained beside the student
    def save_companions(self, folder: Path) -> None:
        """Save the models this module trains beside the student (GAD's discriminator) into the student's
        folder as it is written. Most modules train the student alone: nothing to save."""

    def load_companions(self, folder: Path) -> None:
        """Take up the companions an earlier run saved beside the student this run starts from (a pipeline
        variant's ``init_from``), so a run continues that run's discriminator instead of making a new one."""

    def setup(self, stage: str) -> None:
        strategy = type(self.trainer.strategy).__name__
        if strategy == "FSDPStrategy" and not self.runs_under_fsdp:
            raise ValueError(
                f"{type(self).__name__} does not train under trainer=fsdp: its step runs several backward passes, "
                "and FSDP allows one per forward; use trainer=gpu or trainer=ddp"
            )
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None) or {}
        if (
            strategy == "DDPStrategy"
            and self.trainer_overrides.get("ddp_find_unused_parameters")
            and not ddp_kwargs.get("find_unused_parameters")
        ):
            raise ValueError(
                f"{type(self).__name__} under DDP needs find_unused_parameters: its models take turns, so each "
                "backward pass reaches only one of them; use strategy='ddp_find_unused_parameters_true' "
                "(kdl's trainer=ddp sets it for this module)"
            )

    def on_fit_start(self) -> None:
        self.student.train()  # HF from_pretrained returns eval mode; Lightning no longer flips it
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    @property
    def teacher_is_served(self) -> bool:
        return gives_rows(self.teacher)

    def _place_teacher(self) -> None:
        if self.teacher is None or self.teacher_is_served:
            return
        if getattr(self.teacher, "_kdl_sharded", False):
            pass
        elif self._teacher_should_shard():
            shard_frozen_model(self.teacher, self.device.type)  # moves each rank's shard to the device
            object.__setattr__(self.teacher, "_kdl_sharded", True)
        else:
            self.teacher.to(self.device)
        self.teacher.eval()

    def _teacher_should_shard(self) -> bool:
        if self.trainer_world_size() < 2:
            return False
        if self.shard_teacher is not None:
            return self.shard_teacher
        name = type(self.trainer.strategy).__name__
        return name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except by norm under FSDP: Lightning's FSDP precision refuses it, and the
        norm must be taken over every rank's shard, which the sharded root's ``clip_grad_norm_`` does. Both
        ``trainer.gradient_clip_val`` (automatic optimization) and MiniLLM's ``max_grad_norm`` come here."""
        root = self._fsdp_root()
        if root is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        if gradient_clip_val and self._fused_without_scaler(optimizer):
            # Lightning refuses to clip for a fused optimizer under mixed precision, because a gradient
            # scaler's unscaling would then happen inside the optimizer; bf16 and fp32 use no scaler, so the
            # gradients are already unscaled and clipping them here is exact.
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
            else:
                torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fused_without_scaler(self, optimizer: torch.optim.Optimizer) -> bool:
        """A fused optimizer (``optimizer.fused=true``) trained without a gradient scaler (not fp16)."""
        fused = any(group.get("fused") for group in optimizer.param_groups)
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        return fused and getattr(plugin, "scaler", None) is None

    def on_train_end(self) -> None:
        # Under FSDP, gather the full student while its shards are still on the devices and the process
        # group is up (every rank takes part; rank 0 receives it): what is saved and evaluated after fit.
        if self._fsdp_root() is not None:
            self.gathered_state = self.trainer.strategy.lightning_module_state_dict()

    def _fsdp_root(self) -> Any:
        """The FullyShardedDataParallel module that wraps this one under FSDPStrategy, else None."""
        trainer = self._trainer
        if trainer is None:
            return None
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:  # a torch built without distributed
            return None
        model = trainer.strategy.model
        return model if isinstance(model, FullyShardedDataParallel) else None

    # ---------------------------------------------------------------- exact accumulation
    def token_sum(self, token_mean: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for a micro-batch whose loss is a mean over ``tokens`` target tokens:
        its sum over them, and the tokens counted towards this optimizer step.

        :meth:`on_before_optimizer_step` then divides the accumulated gradient by the step's tokens (over
        every micro-batch and rank), so the gradient is the mean over all target tokens of the step: a
        short answer's tokens weigh what a long one's do, whatever micro-batch or rank they fall in. (Lightning
        averages micro-batch losses, and DDP ranks; both would weight by batch, not by token.)
        """
        tokens = tokens.detach().to(torch.float64)
        self._window_tokens = tokens if self._window_tokens is None else self._window_tokens + tokens
        return token_mean * tokens.to(token_mean.dtype)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the accumulated gradient the step's token mean (see :meth:`token_sum`); before clipping."""
        if self._window_tokens is None:
            return
        tokens, self._window_tokens = self._window_tokens, None
        world = self.trainer_world_size()
        if world > 1:
            tokens = self.all_gather(tokens).sum()
        accumulate = (
            int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1)
            if self.automatic_optimization
            else 1
        )
        factor = float(world * accumulate) / max(float(tokens), 1.0)  # Lightning divided by the accumulation
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)

    def configure_optimizers(self):
        # the student and any trainable term parameters; the teacher is not a submodule
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- seeds and timing
    def step_seed(self, stream: str) -> int:
        """The seed of random ``stream`` at this step: ``seed · 1_000_003 + step · m + c`` (see SEED_STREAMS)."""
        multiplier, offset = SEED_STREAMS[stream]
        return self.seed * 1_000_003 + int(self.global_step) * multiplier + offset

    @contextmanager
    def timed(self, phase: str, batch_size: int) -> Iterator[None]:
        """Time a phase of the training step: kept in ``step_seconds`` and logged as ``time/<phase>``."""
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.step_seconds.setdefault(phase, []).append(seconds)
        self.log(f"time/{phase}", seconds, batch_size=batch_size)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val = {"nll": zero.clone(), "tokens": zero.clone()}
        self._val_rkl: list[tuple[float, float]] = []  # (token-mean KL, tokens) per batch
        self._val_predictions: list[str] = []
        self._val_references: list[str] = []

    @torch.no_grad()
    def validation_step(self, batch: TextBatch, batch_idx: int) -> None:
        mask = batch.target_ids != IGNORE_INDEX
        logits = target_position_logits(
            self.student, batch.input_ids, batch.attention_mask, mask, batch.position_ids
        )
        self._val["nll"] += token_cross_entropy(logits[None], batch.target_ids[mask][None]).sum().double()
        self._val["tokens"] += mask.sum().double()
        if len(self._val_predictions) < self.eval_generation_limit:
            self.generation_eval(batch, batch_idx)

    def generation_eval(self, batch: TextBatch, batch_idx: int) -> None:
        """Greedy replies to held-out prompts (ROUGE-L) and, with a teacher, the sampled reverse KL."""
        room = self.eval_generation_limit - len(self._val_predictions)
        rows = batch.rows(slice(0, room))
        prompts = prompts_from_batch(rows)
        self._val_predictions += generate_greedy(  # the one greedy generation kdl evaluate uses too
            self.student, self.tokenizer, prompts, self.eval_max_new_tokens, batch_size=len(prompts)
        )
        mask = rows.target_ids != IGNORE_INDEX
        for row in range(len(prompts)):
            response = rows.target_ids[row][mask[row]]
            self._val_references.append(
                self.tokenizer.decode(response.tolist(), skip_special_tokens=True).strip()
            )
        if self.teacher is None or not self.teacher_shares_vocabulary or self.teacher_is_served:
            return  # the sampled reverse KL compares per-token probabilities of one vocabulary's whole rows
        measured = sampled_reverse_kl(
            self.student,
            self.teacher,
            prompts,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            max_new_tokens=self.eval_max_new_tokens,
            batch_size=len(prompts),
            seed=batch_idx,
        )
        self._val_rkl.append((measured["reverse_kl"], measured["response_tokens"] * len(prompts)))

    def on_validation_epoch_end(self) -> None:
        totals = {k: self.all_gather(v).sum() for k, v in self._val.items()}
        nll = (totals["nll"] / totals["tokens"].clamp_min(1.0)).float()
        self.log("val/nll", nll, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(nll), sync_dist=False)
        if self._val_predictions:
            self.log("val/rouge_l", rouge_l(self._val_predictions, self._val_references), prog_bar=True)
        if self._val_rkl:
            tokens = sum(n for _, n in self._val_rkl)
            self.log(
                "val/reverse_kl", sum(kl * n for kl, n in self._val_rkl) / max(tokens, 1.0), prog_bar=True
            )


def module_class(factory: Callable[..., Any]) -> type[StudentModule]:
    """The class a ``module`` partial builds, refusing one that is not a :class:`StudentModule`."""
    target = getattr(factory, "func", factory)
    if not (isinstance(target, type) and issubclass(target, StudentModule)):
        raise ValueError(
            f"module._target_={getattr(target, '__qualname__', target)} is not a StudentModule subclass; "
            "subclass kd_lightning.modules.distill.DistillModule (or StudentModule) for your module"
        )
    return target
