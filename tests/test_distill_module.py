"""DistillModule: the packed target-position path equals full logits with masks; teacher-free lifecycle."""

from __future__ import annotations

import torch

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.losses import HardCrossEntropy, SoftLabelKL
from kd_lightning.losses.divergences import sparse_target_kl
from kd_lightning.losses.functional import IGNORE_INDEX, hard_cross_entropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules.distill import DistillModule


def setup(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:12], tok, 96)
    rows, _ = NGramPriorEstimator(ngram_order=3, top_k=8).estimate(corpus, len(tok))
    store = write_store(tmp_path / "prior", rows, corpus.target_offsets(), {})
    dm = TeacherTextDataModule(batch_size=6).connect(tok.pad_token_id, corpus, stores={"prior": store})
    return tok, next(iter(dm.train_dataloader()))


def test_packed_target_positions_equal_full_logits(tiny_dir, tmp_path):
    tok, batch = setup(tiny_dir, tmp_path)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    module = DistillModule(
        student,
        {"hard_ce": HardCrossEntropy(), "prior_kl": SoftLabelKL("prior")},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    logits, packed = module.student_logits(batch)
    ours = {name: value for name, (_, value) in module.compute_terms(logits, packed).items()}
    full = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.target_ids != IGNORE_INDEX
    torch.testing.assert_close(
        ours["hard_ce"], hard_cross_entropy(full, batch.target_ids), atol=1e-5, rtol=1e-5
    )
    expected_kl = sparse_target_kl(
        full,
        batch.soft_labels["prior"].ids,
        batch.soft_labels["prior"].probs,
        batch.soft_labels["prior"].tail,
        mask,
    )
    torch.testing.assert_close(ours["prior_kl"], expected_kl, atol=1e-5, rtol=1e-5)
    assert logits.shape == (1, int(mask.sum()), len(tok))


def test_head_shortcut_is_verified_and_used_for_llama(tiny_dir, tmp_path):
    tok, batch = setup(tiny_dir, tmp_path)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    mask = batch.target_ids != IGNORE_INDEX
    rows = target_position_logits(model, batch.input_ids, batch.attention_mask, mask)
    assert model._kdl_head_shortcut is True
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
    torch.testing.assert_close(rows, full, atol=1e-5, rtol=1e-5)


def test_model_without_the_pattern_keeps_the_plain_path(tiny_dir, tmp_path):
    tok, batch = setup(tiny_dir, tmp_path)
    model = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.config.final_logit_softcapping = None
    original = model.forward

    def capped_forward(*args, **kwargs):  # a model that post-processes its logits
        out = original(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    model.forward = capped_forward
    mask = batch.target_ids != IGNORE_INDEX
    rows = target_position_logits(model, batch.input_ids, batch.attention_mask, mask)
    assert model._kdl_head_shortcut is False
    torch.testing.assert_close(
        rows,
        capped_forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask],
    )


def test_student_is_put_in_train_mode_and_optimizer_covers_only_trainable_params(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).eval()
    student.model.embed_tokens.requires_grad_(False)
    module = DistillModule(
        student, {"hard_ce": HardCrossEntropy()}, optimizer=lambda params: torch.optim.AdamW(params)
    )
    module.on_fit_start()
    assert student.training
    optimizer = module.configure_optimizers()
    n_params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert n_params == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert "student" not in module.hparams and "loss_terms" not in module.hparams


def test_training_step_with_loss_chunks_equals_plain(tiny_dir, tmp_path):
    tok, batch = setup(tiny_dir, tmp_path)
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": SoftLabelKL("prior", weight=0.5)}
    grads = []
    for chunk in (None, 5):
        student = tiny_llama(
            len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=3
        )
        module = DistillModule(
            student, terms, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), loss_chunk_size=chunk
        )
        module.log = lambda *args, **kwargs: None  # outside a Trainer
        loss = module.training_step(batch, 0)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (plain, g_plain), (chunked, g_chunked) = grads
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_plain, g_chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
