"""The prior's settings for a fluent student and what reads them: smoothing at equal mass (uniform, unigram,
n-gram), gamma_by_count, the context counts the store keeps (and the batch carries) for
``weighting=prior_reliability``, and the kd_weight_schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.batch import PositionBatch, SoftLabels
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramModel, NGramPriorEstimator
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.losses.weighting import reliability_weights
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.modules.schedule import KDWeightSchedule
from tests.helpers.cli import kdl


@pytest.fixture()
def corpus(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    return tok, tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:40], tok, 96)


def observed_mass(rows, observed: np.ndarray) -> np.ndarray:
    ids, probs = np.asarray(rows.ids).astype(np.int64), np.asarray(rows.probs, dtype=np.float64)
    return np.where(ids == observed[:, None], probs, 0.0).sum(1)


@pytest.mark.parametrize("smoothing", ["ngram", "unigram", "uniform"])
def test_every_smoothing_puts_the_same_mass_on_the_observed_token(corpus, smoothing):
    tok, data = corpus
    vocab, gamma = len(tok), 4.0
    rows, stats, channels = NGramPriorEstimator(
        3, gamma=gamma, top_k=8, smoothing=smoothing
    ).estimate_with_channels(data, vocab)
    events = np.flatnonzero(data.target_mask()) + 1
    observed = data.tokens[events].astype(np.int64)
    if smoothing == "uniform":
        smooth = np.full(len(events), 1.0 / vocab)
    else:
        order = 3 if smoothing == "ngram" else 1
        model = NGramModel(order, vocab).fit(data.tokens, data.offsets, np.roll(data.target_mask(), 1))
        smooth = observed_mass(model.distributions(data.tokens, data.offsets, events, 8).rows, observed)
    expected = (1 - 1 / gamma) + smooth / gamma  # the one-hot's share is the same; only the smoothing differs
    np.testing.assert_allclose(observed_mass(rows, observed), expected, atol=2e-3)  # float16 rows
    np.testing.assert_allclose(np.asarray(rows.probs, np.float64).sum(1) + rows.tail, 1.0, atol=2e-3)
    assert stats["smoothing"] == smoothing and set(channels) == {"context_count", "ngram_order"}
    if smoothing == "unigram":
        assert (channels["ngram_order"] == 1).all()
        assert (channels["context_count"] == np.roll(data.target_mask(), 1).sum()).all()


def test_gamma_by_count_shrinks_the_ngram_where_its_context_is_thin(corpus):
    tok, data = corpus
    plain, _, channels = NGramPriorEstimator(3, gamma=2.0, top_k=8).estimate_with_channels(data, len(tok))
    shrunk, stats, _ = NGramPriorEstimator(3, gamma=2.0, top_k=8, gamma_by_count=5.0).estimate_with_channels(
        data, len(tok)
    )
    n = channels["context_count"].astype(np.float64)
    events = np.flatnonzero(data.target_mask()) + 1
    observed = data.tokens[events].astype(np.int64)
    smooth = (observed_mass(plain, observed) - 0.5) * 2.0  # p_ngram(observed), from the γ=2 prior
    gamma = 2.0 * (1 + 5.0 / n)
    np.testing.assert_allclose(observed_mass(shrunk, observed), 1 - 1 / gamma + smooth / gamma, atol=3e-3)
    assert stats["mean_gamma"] > 2.0
    with pytest.raises(ValueError, match="gamma_by_count"):
        NGramPriorEstimator(gamma_by_count=-1.0)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        NGramPriorEstimator(smoothing="laplace")


def test_the_prior_store_keeps_context_counts_and_the_batch_carries_them(corpus, tmp_path):
    tok, data = corpus
    rows, _, channels = NGramPriorEstimator(3, top_k=8).estimate_with_channels(data, len(tok))
    store = write_store(tmp_path / "prior", rows, data.target_offsets(), {}, channels=channels)
    assert store.channels == ("context_count", "ngram_order")
    np.testing.assert_array_equal(store.channel("context_count"), channels["context_count"])
    batch = next(iter(TeacherTextDataModule(batch_size=4, packing=True).connect(
        tok.pad_token_id, data, stores={"prior": store}
    ).train_dataloader()))  # fmt: skip
    packed = PositionBatch.pack(batch)
    counts = packed.soft_labels["prior"].channels["context_count"]
    assert counts.shape == packed.target_ids.shape and bool((counts >= 1).all())
    weights = reliability_weights(packed, pseudocount=3.0)
    torch.testing.assert_close(weights, counts / (counts + 3.0))
    term = ForwardKL("prior", weighting="prior_reliability", reliability_pseudocount=3.0)
    logits = torch.randn(*packed.target_ids.shape, len(tok))
    plain = ForwardKL("prior", weighting="none")
    assert float(term(logits, packed)) < float(plain(logits, packed))  # every weight is below 1
    with pytest.raises(ValueError, match="shape"):
        write_store(tmp_path / "bad", rows, data.target_offsets(), {}, channels={"context_count": np.ones(3)})


def test_reliability_weighting_without_counts_is_one_line():
    batch = PositionBatch(
        torch.tensor([[1, 2]]),
        {"prior": SoftLabels(torch.tensor([[[1], [2]]]), torch.ones(1, 2, 1), torch.zeros(1, 2))},
    )
    with pytest.raises(KeyError, match="context counts"):
        ForwardKL("prior", weighting="prior_reliability")(torch.randn(1, 2, 5), batch)


def test_the_schedule_factors():
    ramp, decay = KDWeightSchedule("ramp_up", 0.5), KDWeightSchedule("decay", 0.25)
    assert [ramp.factor(s, 10) for s in (0, 2, 5, 9)] == [0.0, 0.4, 1.0, 1.0]
    assert [decay.factor(s, 8) for s in (0, 6, 7)] == [1.0, 1.0, 0.5]
    assert KDWeightSchedule().factor(3, 10) == 1.0
    with pytest.raises(ValueError, match=r"kd_weight_schedule\.kind"):
        KDWeightSchedule("cosine")


def test_a_scheduled_module_scales_only_the_divergence_terms(tiny_dir, corpus):
    from kd_lightning.models.builders import tiny_llama
    from kd_lightning.modules.distill import DistillModule

    tok, data = corpus
    rows, _ = NGramPriorEstimator(3, top_k=8).estimate(data, len(tok))
    store = write_store(tiny_dir.parent / "sched_prior", rows, data.target_offsets(), {})
    batch = next(
        iter(
            TeacherTextDataModule(batch_size=4)
            .connect(tok.pad_token_id, data, stores={"prior": store})
            .train_dataloader()
        )
    )
    student = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior", weight=2.0)}
    module = DistillModule(
        student,
        terms,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        kd_weight_schedule=KDWeightSchedule("ramp_up"),
    )
    logits, packed = module.student_logits(batch)
    values = {n: float(v.detach()) for n, (_, v) in module.compute_terms(logits, packed).items()}
    module.kd_weight_scale = lambda: 0.25  # a quarter into the ramp
    tokens = int(batch.target_mask.sum())
    total = float(module.training_step(batch, 0).detach()) / tokens  # it returns the step's token sum
    assert total == pytest.approx(values["hard_ce"] + 0.25 * 2.0 * values["prior_kl"], rel=1e-5)


def test_kdl_distill_logs_the_ramp(kdl_env):
    kdl(
        "distill", "experiment=tiny", "loss=[hard_ce,prior_kl]", "kd_weight_schedule.kind=ramp_up",
        "kd_weight_schedule.fraction=1.0", "trainer.max_steps=4", "trainer.log_every_n_steps=1", env_dir=kdl_env,
    )  # fmt: skip
    import csv

    rows = list(csv.DictReader(next((kdl_env / "outputs").rglob("metrics.csv")).open()))
    scales = [float(r["train/kd_weight_scale"]) for r in rows if r.get("train/kd_weight_scale")]
    assert scales == [0.0, 0.25, 0.5, 0.75]
