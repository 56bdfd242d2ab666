"""Online white-box teacher: frozen, out of optimizer and checkpoint, vocabulary checked, trains the student."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import ForwardKL, GeneralizedJSD, HardCrossEntropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.teacher import OnlineTeacherDistillModule
from tests.helpers.training import fit_one_batch


def build(tiny_dir, terms=None):
    tok = load_tokenizer(tiny_dir)
    teacher = load_causal_lm(tiny_dir)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    terms = terms or {"kd": ForwardKL("teacher")}
    module = OnlineTeacherDistillModule(
        student, teacher, terms, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3)
    )
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:32], tok, 96)
    dm = TeacherTextDataModule(batch_size=8).connect(tok.pad_token_id, corpus)
    return module, dm, teacher


def test_teacher_is_frozen_and_outside_optimizer_and_checkpoint(tiny_dir, tmp_path):
    module, dm, teacher = build(tiny_dir)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("teacher") for k in module.state_dict())
    optimizer = module.configure_optimizers()
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in teacher.parameters()}
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert saved and all(k.startswith("student.") for k in saved)
    assert not teacher.training  # still eval after fitting


def test_vocabulary_mismatch_is_refused_at_construction(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    with pytest.raises(ValueError, match=r"config\.vocab_size"):
        OnlineTeacherDistillModule(
            tiny_llama(len(tok) + 5),
            load_causal_lm(tiny_dir),
            {"kd": ForwardKL("teacher")},
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )


@pytest.mark.parametrize("term", [ForwardKL("teacher"), GeneralizedJSD("teacher", beta=0.5)])
def test_distilling_from_the_teacher_lowers_the_divergence(tiny_dir, term):
    module, dm, _ = build(tiny_dir, {"kd": term, "ce": HardCrossEntropy(weight=0.0)})
    batch = next(iter(dm.train_dataloader()))
    values = fit_one_batch(module, batch, steps=25)
    assert values[-1] < 0.7 * values[0]
