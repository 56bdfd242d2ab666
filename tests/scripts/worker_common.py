"""What the DDP worker scripts share: the tiny corpus, one quiet CPU Trainer, a per-step record, a file per rank.

The scripts import it by name: Python puts a script's own folder first on ``sys.path``, under Lightning's DDP
launcher too (it re-executes the same command per rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records


def tiny_corpus(tiny_dir: str, tok, records: int) -> TokenizedCorpus:
    """The first ``records`` of the tiny model's corpus, tokenised to 96 tokens."""
    return tokenize_records(read_jsonl(Path(tiny_dir) / "corpus.jsonl")[:records], tok, 96)


def quiet_trainer(
    *,
    devices: int,
    strategy: str,
    max_steps: int,
    callbacks: Sequence[Callback],
    accumulate_grad_batches: int = 1,
) -> Trainer:
    """A CPU Trainer that trains only: no logger, checkpoints, bars, validation, or distributed sampler (the
    tests split the global batch over the ranks themselves)."""
    return Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate_grad_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StepRecord(Callback):
    """Per training step: the rollout seed and rollout the module kept (``last_rollout_seed``,
    ``last_rollout``), the logged ``metrics`` present, and the module's state after the step (``initial``:
    before the first)."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self.metrics = tuple(metrics)
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.initial = module_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps.append(
            {
                "seed": pl_module.last_rollout_seed,
                "rollout": pl_module.last_rollout,
                "logged": {k: float(logged[k]) for k in self.metrics if k in logged},
                "state": module_state(pl_module),
            }
        )


def save_rank(trainer: Trainer, out: str, record: StepRecord, steps: int) -> None:
    """``OUT.rankR.pt``: the record's first ``steps`` steps, its initial state and the world size."""
    torch.save(
        {"initial": record.initial, "steps": record.steps[:steps], "world": trainer.world_size},
        f"{out}.rank{trainer.global_rank}.pt",
    )
