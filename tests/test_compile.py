"""``trainer.compile=true``: a compiled training step equals the eager one (loss and gradients within a
stated tolerance), the compiled decoder never reaches a checkpoint or a saved student, generation stays
eager, and a machine where torch cannot compile trains eagerly after one line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import HardCrossEntropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.forward import TRAINING_DECODER, compile_for_training, release_compiled
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules import compiled as compiled_module
from kd_lightning.modules.distill import DistillModule
from tests.helpers.cli import artifacts, kdl

COMPILED_TOLERANCE = 1e-4
"""Relative tolerance of a compiled fp32 step against the eager one (inductor reorders float sums)."""


def step(module: DistillModule, batch) -> tuple[float, dict[str, torch.Tensor]]:
    module.student.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in module.student.named_parameters()}


def hard_ce_module(tiny_dir) -> tuple[DistillModule, object]:
    """A 2-layer student under hard CE, fit-started, and one padded batch of the tiny corpus."""
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:8], tok, 96)
    batch = next(
        iter(TeacherTextDataModule(batch_size=4).connect(tok.pad_token_id, corpus).train_dataloader())
    )
    torch.manual_seed(0)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    module = DistillModule(
        student, {"hard_ce": HardCrossEntropy()}, optimizer=lambda params: torch.optim.SGD(params)
    )
    module.on_fit_start()
    return module, batch


def test_a_compiled_training_step_equals_the_eager_one_and_stays_out_of_the_state(tiny_dir):
    module, batch = hard_ce_module(tiny_dir)
    student = module.student
    eager_loss, eager_grads = step(module, batch)
    keys = set(student.state_dict())
    compile_for_training(student)
    compiled_loss, compiled_grads = step(module, batch)
    assert TRAINING_DECODER in student.__dict__
    assert compiled_loss == pytest.approx(eager_loss, rel=COMPILED_TOLERANCE)
    for name, grad in eager_grads.items():
        scale = float(grad.abs().max().clamp_min(1e-12))
        assert float((compiled_grads[name] - grad).abs().max()) <= COMPILED_TOLERANCE * scale, name
    assert set(student.state_dict()) == keys and set(module.state_dict()) == {f"student.{k}" for k in keys}
    student.eval()  # evaluation and generation take the eager decoder
    from kd_lightning.models import forward

    assert forward._decoder(student) is student.get_decoder()
    release_compiled(student)
    assert TRAINING_DECODER not in student.__dict__


def test_trainer_compile_compiles_the_hard_ce_term_too_with_the_eager_steps_values(tiny_dir):
    """The loss term's forward over the (N, V) logits joins the compiled step where its code declares it
    (HardCrossEntropy): loss and gradients equal the eager step's; released after fit."""
    from types import SimpleNamespace

    module, batch = hard_ce_module(tiny_dir)
    student = module.student
    eager_loss, eager_grads = step(module, batch)
    callback = compiled_module.CompileStudent()
    callback.on_fit_start(SimpleNamespace(), module)
    term = module.loss_terms["hard_ce"]
    assert term._compiled_call_impl is not None and TRAINING_DECODER in student.__dict__
    compiled_loss, compiled_grads = step(module, batch)
    assert compiled_loss == pytest.approx(eager_loss, rel=COMPILED_TOLERANCE)
    for name, grad in eager_grads.items():
        scale = float(grad.abs().max().clamp_min(1e-12))
        assert float((compiled_grads[name] - grad).abs().max()) <= COMPILED_TOLERANCE * scale, name
    callback.on_fit_end(SimpleNamespace(), module)
    assert term._compiled_call_impl is None and TRAINING_DECODER not in student.__dict__


def test_kdl_distill_with_compile_trains_records_the_compile_cost_and_keys_the_student_apart(kdl_env):
    eager = kdl("distill", "experiment=tiny", "loss=[hard_ce]", "trainer.max_steps=4", env_dir=kdl_env)
    compiled = kdl(
        "distill",
        "experiment=tiny",
        "loss=[hard_ce]",
        "trainer.max_steps=4",
        "trainer.compile=true",
        env_dir=kdl_env,
    )
    assert "compiling the student took" in compiled.stderr + compiled.stdout
    folders = sorted(artifacts(kdl_env, "distill"))
    assert len(folders) == 2  # compile is part of the student's key: its float sums may differ
    records = [json.loads((f / "student" / "kdl_training.json").read_text()) for f in folders]
    assert sorted("compile_seconds" in r for r in records) == [False, True]
    assert eager.returncode == compiled.returncode == 0


def test_where_torch_cannot_compile_training_goes_on_eagerly_after_one_line(kdl_env, monkeypatch, caplog):
    monkeypatch.setitem(
        compiled_module._PROBED, "reason", "InvalidCxxCompiler: no working C++ compiler found"
    )
    with caplog.at_level(logging.WARNING):
        done = kdl(
            "distill",
            "experiment=tiny",
            "loss=[hard_ce]",
            "trainer.max_steps=2",
            "trainer.compile=true",
            env_dir=kdl_env,
        )
    out = done.stderr + done.stdout + caplog.text
    assert out.count("torch.compile cannot run here (InvalidCxxCompiler") == 1 and "training eagerly" in out
    record = json.loads(
        next(iter(artifacts(kdl_env, "distill"))).joinpath("student", "kdl_training.json").read_text()
    )
    assert "compile_seconds" not in record


def test_a_released_student_can_be_freed(tiny_dir):
    """A pipeline trains many students in one process: once released, a compiled student is not kept alive by
    torch's compile caches."""
    import gc
    import weakref

    tok = load_tokenizer(tiny_dir)
    student = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    compiled = compile_for_training(student)
    compiled(input_ids=torch.tensor([[1, 2, 3]]))
    ref = weakref.ref(student)
    release_compiled(student)
    del student, compiled
    gc.collect()
    assert ref() is None


def test_the_eager_attention_kernel_trains_the_same_step_as_sdpa_packed_rows_included(tiny_dir):
    """``student_attn_implementation=eager`` is a speed lever only: the same loss and gradients as sdpa
    (fp32, within float reordering), packed records still kept apart."""
    from kd_lightning.models.forward import check_packing
    from kd_lightning.models.loading import set_attention

    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:8], tok, 96)
    padded = next(
        iter(TeacherTextDataModule(batch_size=4).connect(tok.pad_token_id, corpus).train_dataloader())
    )
    packed = next(
        iter(
            TeacherTextDataModule(batch_size=2, packing=True, pack_length=128)
            .connect(tok.pad_token_id, corpus)
            .train_dataloader()
        )
    )
    assert int((packed.position_ids[:, 1:] == 0).sum()) >= 1  # a row holds two records or more
    torch.manual_seed(0)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    module = DistillModule(
        student, {"hard_ce": HardCrossEntropy()}, optimizer=lambda params: torch.optim.SGD(params)
    )
    module.on_fit_start()
    assert student.config._attn_implementation == "sdpa"
    reference = [step(module, batch) for batch in (padded, packed)]
    set_attention(student, "eager")
    assert student.config._attn_implementation == "eager"
    check_packing(student)
    for (sdpa_loss, sdpa_grads), batch in zip(reference, (padded, packed), strict=True):
        eager_loss, eager_grads = step(module, batch)
        assert eager_loss == pytest.approx(sdpa_loss, rel=COMPILED_TOLERANCE)
        for name, grad in sdpa_grads.items():
            scale = float(grad.abs().max().clamp_min(1e-12))
            assert float((eager_grads[name] - grad).abs().max()) <= COMPILED_TOLERANCE * scale, name


def test_kdl_distill_takes_the_attention_kernel_into_the_students_key_and_refuses_an_unknown_one(kdl_env):
    args = ("distill", "experiment=tiny", "loss=[hard_ce]", "trainer.max_steps=2")
    kdl(*args, env_dir=kdl_env)
    kdl(*args, "student_attn_implementation=eager", env_dir=kdl_env)
    assert len(artifacts(kdl_env, "distill")) == 2  # another kernel sums in another order: another student
    bad = kdl(*args, "student_attn_implementation=flash", env_dir=kdl_env, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "student_attn_implementation='flash' is not an attention kernel transformers knows" in bad.stderr
    assert "eager" in bad.stderr and "sdpa" in bad.stderr
