"""A few steps of online-teacher KD on tiny models, single-process or under a Lightning strategy.

Run by ``tests/test_distributed.py`` as a script (Lightning's DDP launcher re-executes it per rank):

    python tests/scripts/ddp_worker.py TINY_DIR OUT.pt STRATEGY DEVICES BATCH_SIZE [SHARD_TEACHER [ACCUMULATE]]
"""

from __future__ import annotations

import sys

import torch
from lightning import Callback
from worker_common import quiet_trainer, tiny_corpus

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.teacher import OnlineTeacherDistillModule


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main() -> None:
    tiny_dir, out, strategy, devices, batch_size = sys.argv[1:6]
    shard_teacher = len(sys.argv) > 6 and sys.argv[6] == "shard"
    accumulate = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    torch.use_deterministic_algorithms(True)
    tok = load_tokenizer(tiny_dir)
    corpus = tiny_corpus(tiny_dir, tok, 22)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    module = OnlineTeacherDistillModule(
        student,
        load_causal_lm(tiny_dir),
        {"kd": ForwardKL("teacher"), "ce": HardCrossEntropy(weight=0.5)},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        shard_teacher=shard_teacher,
    )
    data = TeacherTextDataModule(batch_size=int(batch_size), shuffle_seed=0).connect(tok.pad_token_id, corpus)
    record = RecordLoss()
    trainer = quiet_trainer(
        devices=int(devices),
        strategy=strategy,
        max_steps=3,
        callbacks=[record],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, datamodule=data)
    if trainer.global_rank == 0:
        state = {k: v.detach().cpu().clone() for k, v in module.student.state_dict().items()}
        teacher_local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in module.teacher.parameters()
        )
        teacher_full = sum(p.numel() for p in module.teacher.parameters())
        torch.save(
            {
                "losses": record.losses,
                "student": state,
                "world": trainer.world_size,
                "teacher_local_fraction": teacher_local / teacher_full,
            },
            out,
        )


if __name__ == "__main__":
    main()
