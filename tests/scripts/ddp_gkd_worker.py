"""A few fully on-policy GKD steps on tiny models: under 2-process DDP, or one process replaying rollouts.

Run by ``tests/test_distributed.py`` as a script (Lightning's DDP launcher re-executes it per rank):

    python tests/scripts/ddp_gkd_worker.py TINY_DIR OUT ddp            # writes OUT.rank0.pt, OUT.rank1.pt
    python tests/scripts/ddp_gkd_worker.py TINY_DIR OUT replay RANK0.pt RANK1.pt

``ddp`` records, per rank and step, the rollout seed, the sampled batch, the step's (global) loss and the
module's state after the step (and before the first). ``replay`` trains one process whose step ``s`` is the union of both
ranks' step-``s`` rollouts (right-padded into one batch, so every row keeps its positions), sampling nothing.
"""

from __future__ import annotations

import sys

import torch
from worker_common import StepRecord, quiet_trainer, save_rank, tiny_corpus

from kd_lightning.data.batch import IGNORE_INDEX, TextBatch
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.losses import GeneralizedJSD
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.on_policy import FixedStudentData, OnPolicyDistillModule

STEPS = 3


class RecordingGKD(OnPolicyDistillModule):
    """Keeps the step's rollout (or, replaying, returns the union of the ranks' rollouts of that step)."""

    replayed: list[TextBatch] | None = None

    def student_samples(self, batch: TextBatch, batch_idx: int = 0) -> TextBatch:
        self.last_rollout_seed = self.rollout_seed(batch_idx)
        if self.replayed is not None:
            sampled = self.replayed[int(self.global_step)]
        else:
            sampled = super().student_samples(batch, batch_idx)
        self.last_rollout = {
            "input_ids": sampled.input_ids.clone(),
            "attention_mask": sampled.attention_mask.clone(),
            "target_ids": sampled.target_ids.clone(),
        }
        return sampled


def right_padded_union(parts: list[dict], pad_id: int) -> TextBatch:
    width = max(p["input_ids"].shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return TextBatch(
        input_ids=torch.cat([pad(p["input_ids"], pad_id) for p in parts]),
        attention_mask=torch.cat([pad(p["attention_mask"], 0) for p in parts]),
        target_ids=torch.cat([pad(p["target_ids"], IGNORE_INDEX) for p in parts]),
    )


def main() -> None:
    tiny_dir, out, mode = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)
    tok = load_tokenizer(tiny_dir)
    corpus = tiny_corpus(tiny_dir, tok, 16)
    # the teacher, perturbed: a student that ends its answers (EOS) after unequal lengths, unlike the teacher
    student = load_causal_lm(tiny_dir)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=noise))
    module = RecordingGKD(
        student,
        load_causal_lm(tiny_dir),
        {"jsd": GeneralizedJSD("teacher", beta=0.5)},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        tokenizer=tok,
        student_data=FixedStudentData(student_data_fraction=1.0),
        max_new_tokens=16,
        seed=3,
    )
    devices, strategy, batch_size = (2, "ddp", 2) if mode == "ddp" else (1, "auto", 4)
    if mode == "replay":
        ranks = [torch.load(path, weights_only=True) for path in sys.argv[4:6]]
        module.replayed = [
            right_padded_union([r["steps"][s]["rollout"] for r in ranks], tok.pad_token_id)
            for s in range(STEPS)
        ]
    data = TeacherTextDataModule(batch_size=batch_size, shuffle_seed=0).connect(tok.pad_token_id, corpus)
    record = StepRecord(["train/loss"])
    trainer = quiet_trainer(devices=devices, strategy=strategy, max_steps=STEPS, callbacks=[record])
    trainer.fit(module, datamodule=data)
    save_rank(trainer, out, record, STEPS)


if __name__ == "__main__":
    main()
