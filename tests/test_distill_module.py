"""DistillModule: the packed target-position path equals full logits with masks; teacher-free lifecycle."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.losses import ForwardKL, HardCrossEntropy
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
        {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior")},
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
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior", weight=0.5)}
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


def test_clipping_by_norm_under_fsdp_goes_through_the_sharded_root(monkeypatch):
    """Lightning's FSDP precision refuses clipping by norm (trainer=fsdp stopped at its first optimizer step
    on an H200); the module clips through the sharded root, whose norm covers every rank's shard."""
    student = tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    module = DistillModule(
        student, {"hard_ce": HardCrossEntropy()}, optimizer=lambda params: torch.optim.SGD(params)
    )
    assert module._fsdp_root() is None  # no trainer, no FSDP: Lightning's own clipping

    clipped: list[float] = []

    class ShardedRoot:
        def clip_grad_norm_(self, max_norm: float) -> None:
            clipped.append(max_norm)

    monkeypatch.setattr(DistillModule, "_fsdp_root", lambda self: ShardedRoot())
    optimizer = module.configure_optimizers()
    module.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    module.clip_gradients(optimizer, gradient_clip_val=0.5)  # Lightning's default algorithm is norm
    assert clipped == [1.0, 0.5]


def test_after_fsdp_training_the_gathered_state_is_loaded_into_a_fresh_plain_student(monkeypatch):
    """FSDP leaves the student wrapped, its parameters views into flat shards (an H200 run failed its held-out
    evaluation on a bf16 view): the state gathered at the end of training goes into a freshly built module."""
    from types import SimpleNamespace

    from kd_lightning.modules.training import unwrapped_module

    def build() -> DistillModule:
        student = tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
        return DistillModule(student, {"hard_ce": HardCrossEntropy()}, optimizer=torch.optim.SGD)

    trained = build()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert unwrapped_module(trained, trainer, build) is trained  # no FSDP: the module itself
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained.gathered_state = {k: v.clone() for k, v in trained.state_dict().items()}
    monkeypatch.setattr(DistillModule, "_fsdp_root", lambda self: object())
    plain = unwrapped_module(trained, trainer, build)
    assert plain is not trained and plain.student is not trained.student
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[key])
    trained.gathered_state = None
    with pytest.raises(RuntimeError, match="without gathering"):
        unwrapped_module(trained, trainer, build)


def test_a_module_with_several_backward_passes_per_step_refuses_fsdp_in_one_line():
    """MiniLLM's PPO updates tripped FSDP's one-backward-per-forward assertion on an H200."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from kd_lightning.modules.minillm import MiniLLMModule

    class SeveralBackwardPasses(DistillModule):
        runs_under_fsdp = False

    student = tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    for cls, refuses in ((DistillModule, False), (SeveralBackwardPasses, True)):
        module = cls(student, {"hard_ce": HardCrossEntropy()}, optimizer=torch.optim.SGD)
        module._trainer = SimpleNamespace(strategy=DDPStrategy())
        module.setup("fit")
        module._trainer = SimpleNamespace(strategy=FSDPStrategy())
        if refuses:
            with pytest.raises(ValueError, match=r"does not train under trainer=fsdp.*use trainer=gpu"):
                module.setup("fit")
        else:
            module.setup("fit")
    assert MiniLLMModule.runs_under_fsdp is False
