"""``trainer.compile=true``: the student's training forward compiled with ``torch.compile`` (inductor).

Inductor fuses the decoder's elementwise work (norms, rotary embeddings, activations) and, on CPU, emits
vectorised C++ for it, which is where an eager CPU step of a small model spends much of its time. Only the
teacher-forced training forward is compiled (see :func:`~kd_lightning.models.forward.compile_for_training`),
and the loss terms whose code declares it (:func:`compile_loss_terms`: hard CE):
rollouts, generation and evaluation stay eager. The first step pays the compilation once; its cost is
logged and kept in the student's training record. Where torch cannot compile (no C++ compiler, an
unsupported platform) training goes on eagerly after one line.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from kd_lightning.losses.terms import LossTerm
from kd_lightning.models.forward import compile_for_training, release_compiled

log = logging.getLogger(__name__)

_PROBED: dict[str, str | None] = {}


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can): a tiny function is compiled once per
    process, so a missing C++ compiler is found before training, not inside the first step."""
    if "reason" not in _PROBED:
        try:
            probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0, dynamic=False)
            probe(torch.ones(8))
            _PROBED["reason"] = None
        except Exception as err:  # any failure means: train eagerly, and say why
            _PROBED["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return _PROBED["reason"]


def compile_loss_terms(module: LightningModule, dynamic: bool | None = None) -> list[str]:
    """Compile the module's loss terms whose code declares it safe (:meth:`LossTerm.can_compile`); their names.

    A term's forward over the (N, V) logits is, for a small model, a large part of a CPU step: eagerly the
    float cast, the log-softmax, the gather and their backward each read and write the whole fp32 matrix.
    ``nn.Module.compile`` leaves the term's parameters and state as they are; :func:`release_loss_terms` undoes
    it."""
    names = []
    for name, term in (getattr(module, "loss_terms", None) or {}).items():
        if isinstance(term, LossTerm) and term.can_compile():
            term.compile(dynamic=dynamic)
            names.append(name)
    return names


def release_loss_terms(module: LightningModule) -> None:
    for term in (getattr(module, "loss_terms", None) or {}).values():
        if isinstance(term, nn.Module) and getattr(term, "_compiled_call_impl", None) is not None:
            term._compiled_call_impl = None  # back to the eager forward (nn.Module.compile's own slot)


class CompileStudent(Callback):
    """Compile the student's training forward when fitting starts; report the compilation's cost.

    Args:
        dynamic: ``torch.compile``'s ``dynamic`` (None: static shapes first, dynamic after a shape changes;
            packed batches keep one shape, so the decoder compiles once).
    """

    def __init__(self, dynamic: bool | None = None) -> None:
        self.dynamic = dynamic
        self.active = False
        self._started = 0.0
        self._steps: list[float] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reason = compile_unavailable()
        if reason is not None:
            log.warning("trainer.compile=true: torch.compile cannot run here (%s); training eagerly", reason)
            return
        compile_for_training(pl_module.student, self.dynamic)
        terms = compile_loss_terms(pl_module, self.dynamic)
        if terms:
            log.info("trainer.compile=true: compiling the loss terms %s too", ", ".join(terms))
        self.active = True

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.active:
            self._steps.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The compilation's cost: each step's time beyond the median step (the first step compiles; a batch
        of a new shape may compile once more), logged and kept in the training record."""
        if not self.active or not self._steps:
            return
        median = statistics.median(self._steps)
        compile_seconds = sum(max(0.0, t - median) for t in self._steps if t > 1.5 * median)
        pl_module.compile_seconds = compile_seconds
        log.info(
            "trainer.compile=true: compiling the student took %.1f s over %d steps (first step %.1f s, a step "
            "%.2f s after)",
            compile_seconds,
            len(self._steps),
            self._steps[0],
            median,
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        release_loss_terms(pl_module)
        release_compiled(pl_module.student)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        release_loss_terms(pl_module)
        release_compiled(pl_module.student)
