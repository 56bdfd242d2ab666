"""Gradient accumulation is exact: an optimizer step over k micro-batches of unequal lengths gets the gradient
of the whole batch at once (every target token weighs the same), in float64 through Lightning's own loop;
Lightning's plain micro-batch average, what this library did before 0.2.0, does not."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules.base import StudentModule
from kd_lightning.modules.distill import DistillModule


class Captured(DistillModule):
    """Keeps the gradient the optimizer is about to apply (after the accumulation's correction)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.captured = {
            n: p.grad.detach().clone() for n, p in self.student.named_parameters() if p.grad is not None
        }


def step_gradient(tiny_dir, batch_size: int, accumulate: int, packing: bool) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(tiny_dir)
    records = read_jsonl(tiny_dir / "corpus.jsonl")[:8]
    corpus = tokenize_records(records, tok, 96)
    assert len({corpus.num_targets(i) for i in range(len(corpus))}) > 3  # unequal lengths
    student = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3)
    teacher = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=4)
    module = Captured(
        student,
        {"hard_ce": HardCrossEntropy(), "kd": ForwardKL("teacher", weight=0.7)},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
        teacher=teacher,
    )
    data = TeacherTextDataModule(batch_size=batch_size, shuffle_seed=0, packing=packing).connect(
        tok.pad_token_id, corpus
    )
    trainer = Trainer(
        accelerator="cpu", precision="64-true", max_steps=1, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=None, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module.captured


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    flat_a = torch.cat([a[n].flatten() for n in a]).double()
    flat_b = torch.cat([b[n].flatten() for n in a]).double()
    cosine = float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))
    return cosine, float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("accumulate", [2, 4])
def test_an_accumulated_step_has_the_whole_batchs_gradient(tiny_dir, accumulate, packing):
    whole = step_gradient(tiny_dir, 8, 1, packing)
    parts = step_gradient(tiny_dir, 8 // accumulate, accumulate, packing)
    cosine, relative = compare(parts, whole)
    assert cosine >= 0.999999 and relative <= 1e-6, (cosine, relative)


def test_the_plain_micro_batch_average_is_not_the_whole_batchs_gradient(tiny_dir, monkeypatch):
    """What the loop did before 0.2.0 (Lightning's average of micro-batch means): this test has the power to
    tell it apart."""
    whole = step_gradient(tiny_dir, 8, 1, False)
    monkeypatch.setattr(StudentModule, "token_sum", lambda self, mean, tokens: mean)
    parts = step_gradient(tiny_dir, 2, 4, False)
    cosine, relative = compare(parts, whole)
    assert relative > 1e-3, (cosine, relative)
