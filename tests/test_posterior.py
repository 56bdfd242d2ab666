"""Posterior update: limits in R, expected counts = mean of sampled, one proxy forward per batch, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.records import read_jsonl
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import DirichletUpdate, ExpectedCountsUpdate, ProxyPosteriorEstimator
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer


def random_dist(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g) * 2, dim=-1)


@pytest.mark.parametrize("rule", [DirichletUpdate(4.0), ExpectedCountsUpdate(4.0)])
def test_zero_rounds_gives_the_prior(rule):
    prior, proxy = random_dist(5, 11, 0), random_dist(5, 11, 1)
    torch.testing.assert_close(rule(prior, proxy, 0), prior)


@pytest.mark.parametrize("rule", [DirichletUpdate(4.0), ExpectedCountsUpdate(4.0)])
def test_many_rounds_approach_the_proxy(rule):
    prior, proxy = random_dist(4, 11, 0), random_dist(4, 11, 1)
    post = rule(prior, proxy, 200_000, torch.Generator().manual_seed(0))
    assert (post - proxy).abs().max() < 5e-3
    torch.testing.assert_close(post.sum(-1), torch.ones(4))


def test_expected_counts_is_the_mean_of_sampled():
    prior, proxy = random_dist(3, 7, 0), random_dist(3, 7, 1)
    sampled, expected = DirichletUpdate(2.0), ExpectedCountsUpdate(2.0)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([sampled(prior, proxy, 8, g) for _ in range(4000)]).mean(0)
    assert (mean - expected(prior, proxy, 8)).abs().max() < 5e-3


def test_posterior_formula():
    prior = torch.tensor([[0.5, 0.5, 0.0]])
    proxy = torch.tensor([[0.0, 0.0, 1.0]])
    post = DirichletUpdate(concentration=2.0)(
        prior, proxy, rounds=2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(post, torch.tensor([[0.25, 0.25, 0.5]]))  # (2*prior + [0,0,2]) / 4


def test_invalid_settings_are_clear_errors():
    with pytest.raises(ValueError, match="concentration"):
        DirichletUpdate(0.0)
    with pytest.raises(ValueError, match="sampling_rounds"):
        ProxyPosteriorEstimator(sampling_rounds=-1)


class CountingProxy(torch.nn.Module):
    """Wraps a model, counts forwards, and can fail after a number of them (a killed stage)."""

    def __init__(self, model, fail_after: int | None = None):
        super().__init__()
        self.model, self.calls, self.fail_after = model, 0, fail_after

    def forward(self, **kwargs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        return self.model(**kwargs)


def tiny_setup(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:24], tokenizer, 96)
    rows, _ = NGramPriorEstimator(ngram_order=3, gamma=2.0, top_k=8).estimate(corpus, len(tokenizer))
    prior = write_store(tmp_path / "prior", rows, corpus.target_offsets(), {"corpus": corpus.fingerprint})
    proxy = freeze(load_causal_lm(tiny_dir))
    return tokenizer, corpus, prior, proxy


def test_all_rounds_come_from_one_forward_per_batch(tiny_dir, tmp_path):
    tokenizer, corpus, prior, proxy = tiny_setup(tiny_dir, tmp_path)
    counting = CountingProxy(proxy)
    est = ProxyPosteriorEstimator(sampling_rounds=64, top_k=8, batch_size=8, shard_size=8)
    store = est.estimate(counting, corpus, prior, tokenizer.pad_token_id, str(tmp_path / "post"), {"r": 64})
    assert counting.calls == 3  # 24 sequences / batch 8, whatever R is
    rows = store.all_rows()
    total = rows.probs.astype(np.float64).sum(1) + rows.tail
    np.testing.assert_allclose(total, 1.0, atol=5e-3)


def test_killed_posterior_leaves_no_store_and_rerun_finishes(tiny_dir, tmp_path):
    tokenizer, corpus, prior, proxy = tiny_setup(tiny_dir, tmp_path)
    est = ProxyPosteriorEstimator(sampling_rounds=4, top_k=8, batch_size=4, shard_size=4, seed=3)
    out = tmp_path / "post"
    with pytest.raises(RuntimeError, match="killed"):
        est.estimate(
            CountingProxy(proxy, fail_after=3), corpus, prior, tokenizer.pad_token_id, str(out), {"r": 4}
        )
    assert not out.exists()  # no half-written store
    assert len(list((tmp_path / "post.partial").glob("shard-*"))) == 3
    resumed = CountingProxy(proxy)
    store = est.estimate(resumed, corpus, prior, tokenizer.pad_token_id, str(out), {"r": 4})
    assert resumed.calls == 3  # only the 3 missing shards of 6
    assert not (tmp_path / "post.partial").exists()
    fresh = est.estimate(proxy, corpus, prior, tokenizer.pad_token_id, str(tmp_path / "fresh"), {"r": 4})
    np.testing.assert_array_equal(store.all_rows().ids, fresh.all_rows().ids)  # same samples: seeds per shard
    np.testing.assert_array_equal(store.all_rows().probs, fresh.all_rows().probs)
    assert isinstance(SoftLabelStore(out), SoftLabelStore)


def test_to_dense_and_back_round_trip():
    probs = random_dist(6, 20, 3)
    rows = SparseRows.from_dense(probs, top_k=20, id_dtype=np.dtype(np.uint16))
    torch.testing.assert_close(rows.to_dense(20), probs, atol=1e-3, rtol=0)


def test_api_evidence_adds_lambda_pseudo_counts_where_it_aligned_and_nothing_elsewhere():
    """p_post = (κ·prior + R·p_proxy + λ·p_api) / (κ + R + λ) at rows with evidence (expected counts:
    no sampling noise); rows without evidence keep (κ·prior + R·p_proxy) / (κ + R)."""
    from kd_lightning.estimation.posterior import ExpectedCountsUpdate

    vocab, k, kappa, rounds, lam = 12, 12, 4.0, 8, 6.0
    g = torch.Generator().manual_seed(0)
    prior = SparseRows.from_dense(
        torch.softmax(torch.randn(3, vocab, generator=g), -1), k, np.dtype(np.uint16)
    )
    proxy = torch.softmax(torch.randn(3, vocab, generator=g), -1)
    api_dense = torch.softmax(torch.randn(3, vocab, generator=g) * 2, -1)
    api = SparseRows.from_dense(api_dense, 5, np.dtype(np.uint16))  # top-5 + a tail, as an API gives
    present = torch.tensor([True, False, True])
    estimator = ProxyPosteriorEstimator(
        update=ExpectedCountsUpdate(kappa), sampling_rounds=rounds, top_k=k, api_evidence_weight=lam
    )
    rows = estimator.posterior_rows(prior, proxy, torch.Generator().manual_seed(0), (api, present))
    dense_prior, api_as_stored = prior.to_dense(vocab), api.to_dense(vocab)
    with_evidence = (kappa * dense_prior + rounds * proxy + lam * api_as_stored) / (kappa + rounds + lam)
    without = (kappa * dense_prior + rounds * proxy) / (kappa + rounds)
    got = rows.to_dense(vocab)
    torch.testing.assert_close(got[0], with_evidence[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(got[2], with_evidence[2], atol=2e-3, rtol=0)
    torch.testing.assert_close(got[1], without[1], atol=2e-3, rtol=0)
    plain = ProxyPosteriorEstimator(update=ExpectedCountsUpdate(kappa), sampling_rounds=rounds, top_k=k)
    same = plain.posterior_rows(prior, proxy, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(rows.probs[1].astype(np.float32), same.probs[1].astype(np.float32), atol=1e-3)
    assert "api_evidence_weight" in estimator.settings() and "api_evidence_weight" not in plain.settings()
    with pytest.raises(ValueError, match="api_evidence_weight must be >= 0"):
        ProxyPosteriorEstimator(api_evidence_weight=-1.0)
