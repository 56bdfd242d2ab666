"""Packed batches: several records per row, positions restarting, no attention across records.

Values equal the padded ones: the distillation losses, the posterior and teacher stores' rows, the prompts
on-policy modules read, and a whole ``kdl distill`` run (alignment, estimation and training packed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lightning.data.collate import collate, pack_rows
from kd_lightning.data.datamodule import SoftLabelDataset, TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.forward import check_packing
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from kd_lightning.modules.distill import DistillModule
from kd_lightning.rollout import prompts_from_batch
from tests.helpers.cli import kdl


def corpus_and_prior(tiny_dir, tmp_path, n: int = 20):
    tokenizer = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:n], tokenizer, 96)
    rows, _ = NGramPriorEstimator(ngram_order=3, top_k=8).estimate(corpus, len(tokenizer))
    prior = write_store(tmp_path / "prior", rows, corpus.target_offsets(), {"corpus": corpus.fingerprint})
    return tokenizer, corpus, prior


def test_first_fit_decreasing_places_every_record_once_within_capacity():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 40, size=rng.integers(1, 20)).tolist()
        capacity = max(lengths) + int(rng.integers(0, 30))
        rows = pack_rows(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        assert len(rows) <= len(lengths)
        assert pack_rows(lengths, capacity) == rows  # a function of the lengths
    assert pack_rows([5, 3, 2, 4], 7) == [[0, 3], [2, 1]] or pack_rows([5, 3, 2, 4], 7) == [[0, 2], [3, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([9], 8)


def test_packed_batch_holds_the_same_targets_and_soft_labels(tiny_dir, tmp_path):
    tokenizer, corpus, prior = corpus_and_prior(tiny_dir, tmp_path)
    items = [SoftLabelDataset(corpus, {"prior": prior})[i] for i in range(10)]
    padded = collate(items, tokenizer.pad_token_id, ("prior",))
    packed = collate(items, tokenizer.pad_token_id, ("prior",), packing=True)
    assert packed.input_ids.numel() < padded.input_ids.numel() and len(packed) < len(padded)
    assert int(packed.attention_mask.sum()) == int(padded.attention_mask.sum())
    # records in packed order: the same target ids and prior rows, record by record
    per_record = {}
    for row in range(len(padded)):
        mask = padded.target_mask[row]
        per_record[row] = (padded.target_ids[row][mask], padded.soft_labels["prior"].probs[row][mask])
    flat_targets = packed.target_ids[packed.target_mask]
    flat_probs = packed.soft_labels["prior"].probs[packed.target_mask]
    at = 0
    for i in packed.record_order:
        targets, probs = per_record[i]
        assert torch.equal(flat_targets[at : at + len(targets)], targets)
        assert torch.equal(flat_probs[at : at + len(targets)], probs)
        at += len(targets)
    assert prompts_from_batch(packed) == prompts_from_batch(padded)


def test_packed_losses_equal_padded_losses_and_gradients(tiny_dir, tmp_path):
    tokenizer, corpus, prior = corpus_and_prior(tiny_dir, tmp_path)
    items = [SoftLabelDataset(corpus, {"prior": prior})[i] for i in range(12)]
    torch.manual_seed(0)
    student = tiny_llama(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    module = DistillModule(
        student,
        {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior")},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    results = []
    for packing in (False, True):
        batch = collate(items, tokenizer.pad_token_id, ("prior",), packing=packing, pack_length=200)
        student.zero_grad()
        logits, positions = module.student_logits(batch)
        terms = {name: value for name, (_, value) in module.compute_terms(logits, positions).items()}
        sum(terms.values()).backward()
        results.append((terms, [p.grad.clone() for p in student.parameters()]))
    (padded, padded_grads), (packed, packed_grads) = results
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=1e-5)
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_stores_equal_padded_stores(tiny_dir, tmp_path):
    tokenizer, corpus, prior = corpus_and_prior(tiny_dir, tmp_path, n=24)
    proxy = freeze(load_causal_lm(tiny_dir))
    stores = {}
    for packing in (False, True):
        posterior = ProxyPosteriorEstimator(
            sampling_rounds=8, top_k=8, batch_size=6, shard_size=8, packing=packing, pack_length=300
        ).estimate(proxy, corpus, prior, tokenizer.pad_token_id, str(tmp_path / f"post{packing}"), {})
        teacher = TeacherTargetBuilder(k=8, batch_size=6, packing=packing, pack_length=300).estimate(
            proxy, corpus, tokenizer.pad_token_id, str(tmp_path / f"teacher{packing}"), {}
        )
        stores[packing] = (posterior.all_rows(), teacher.all_rows())
    for padded, packed in zip(stores[False], stores[True]):
        np.testing.assert_array_equal(padded.ids, packed.ids)  # the same draws and the same top-k
        np.testing.assert_allclose(
            padded.probs.astype(np.float32), packed.probs.astype(np.float32), atol=2e-3
        )
        np.testing.assert_allclose(padded.tail, packed.tail, atol=1e-4)


def test_datamodule_packs_training_batches_only(tiny_dir, tmp_path):
    tokenizer, corpus, prior = corpus_and_prior(tiny_dir, tmp_path)
    dm = TeacherTextDataModule(batch_size=8, packing=True, pack_length=256).connect(
        tokenizer.pad_token_id, corpus, corpus, stores={"prior": prior}
    )
    train = next(iter(dm.train_dataloader()))
    assert train.packed and train.input_ids.shape[1] <= 256 and len(train) < 8
    assert not next(iter(dm.val_dataloader())).packed  # validation rows stay one record each
    with pytest.raises(ValueError, match="pack_length"):
        TeacherTextDataModule(pack_length=0)


class MixingModel(torch.nn.Module):
    """A causal model that ignores ``position_ids``: each position sees the mean of everything before it."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids=None, use_cache=False, attention_mask=None):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        return type("Out", (), {"logits": self.head(h)})()


def test_a_model_that_mixes_packed_records_is_refused():
    with pytest.raises(ValueError, match=r"attends across packed records.*datamodule\.packing=false"):
        check_packing(MixingModel())
    llama = tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    check_packing(llama)
    assert llama._kdl_packing_ok


def test_packed_kdl_distill_matches_the_padded_run(kdl_env):
    results = []
    for extra in ([], ["datamodule.packing=true"]):
        kdl("distill", "experiment=tiny", "loss=[hard_ce,prior_kl,posterior_kl]", *extra, env_dir=kdl_env)
        newest = max((kdl_env / "outputs").rglob("distill_result.json"), key=lambda p: p.stat().st_mtime)
        results.append(json.loads(newest.read_text()))
    padded, packed = results
    assert packed["nll"] == pytest.approx(padded["nll"], abs=2e-3)  # same training, up to float rounding
    # the packed run built its own aligned proxy and posterior (packing is in their keys), the same prior
    assert len(list((kdl_env / "artifacts" / "posterior").glob("*/meta.json"))) == 2
