"""n-gram counting under a memory budget: spilled parts give the in-memory prior to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.ngram import NGramModel, NGramPriorEstimator
from kd_lightning.estimation.ngram_counts import context_hashes, count_order, counts_from_histogram
from kd_lightning.estimation.ngram_external import SpilledOrder, parse_bytes


def zipf_corpus(num_seqs: int, vocab: int, seed: int) -> TokenizedCorpus:
    """Sequences of Zipf tokens (frequent contexts, many backoffs), each with a short prompt."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 90, size=num_seqs)
    tokens = ((rng.zipf(1.3, size=int(lengths.sum())) - 1) % vocab).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, rng.integers(1, 3, size=num_seqs).astype(np.int32))


def assert_same_rows(a, b) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.tail, b.tail)


@pytest.mark.parametrize("workers", [1, 2])
def test_spilled_prior_equals_in_memory_prior_to_the_bit(tmp_path, workers):
    train, held_out = zipf_corpus(600, 300, seed=1), zipf_corpus(120, 300, seed=2)
    settings = dict(ngram_order=4, gamma=2.0, min_context_count=2, top_k=8)
    for corpus in (train, held_out):  # held-out text backs off through every order, unseen parts included
        memory, memory_stats = NGramPriorEstimator(**settings).estimate(corpus, 300, count_corpus=train)
        spilled, spilled_stats = NGramPriorEstimator(
            **settings, memory_budget="64KiB", count_workers=workers, spill_dir=tmp_path
        ).estimate(corpus, 300, count_corpus=train)
        assert_same_rows(memory, spilled)
        assert memory_stats == spilled_stats
        assert len(memory_stats["order_histogram"]) >= 3  # the comparison did exercise backoff
    assert list(tmp_path.iterdir()) == []  # spilled parts are removed after the estimate


def test_budget_forces_many_parts_and_chunks(tmp_path):
    corpus = zipf_corpus(600, 300, seed=3)
    model = NGramModel(3, 300, memory_budget=64 * 1024, spill_dir=tmp_path).fit(corpus.tokens, corpus.offsets)
    counts = model.counts(3)
    assert isinstance(counts, SpilledOrder) and counts.bits >= 4
    assert len(list(model._external.chunks())) >= 5
    in_memory = NGramModel(3, 300).fit(corpus.tokens, corpus.offsets).counts(3)
    assert counts.num_pairs == len(in_memory.pair_keys)
    # the parts, concatenated, hold exactly the in-memory (context, token) counts
    loaded = [counts.load(p) for p in range(1 << counts.bits)]
    pair_counts = np.concatenate([p.pair_counts for p in loaded if p is not None])
    assert sorted(pair_counts.tolist()) == sorted(in_memory.pair_counts.tolist())
    model.close()
    assert list(tmp_path.iterdir()) == []


def test_memory_mapped_corpus_and_wide_vocabulary(tmp_path):
    vocab = 70_000  # token ids above 65,535 spill as 32-bit words
    corpus = zipf_corpus(300, vocab, seed=4)
    corpus = TokenizedCorpus(corpus.tokens % 5_000 + 65_000, corpus.offsets, corpus.prompt_lens)
    np.save(tmp_path / "tokens.npy", corpus.tokens)
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    positions = np.arange(len(corpus.tokens))
    memory = NGramModel(3, vocab).fit(corpus.tokens, corpus.offsets)
    spilled = NGramModel(3, vocab, memory_budget="32KiB", spill_dir=tmp_path / "spill").fit(
        mapped, corpus.offsets
    )
    rows_a, orders_a, _ = memory.distributions(corpus.tokens, corpus.offsets, positions, top_k=4)
    rows_b, orders_b, _ = spilled.distributions(corpus.tokens, corpus.offsets, positions, top_k=4)
    assert_same_rows(rows_a, rows_b)
    np.testing.assert_array_equal(orders_a, orders_b)


def test_unigram_histogram_equals_sorted_counts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=2_000).astype(np.int32)
    wbits = (50).bit_length()
    hashes = context_hashes(tokens, np.arange(len(tokens), dtype=np.int32), np.arange(len(tokens)), 0, 50)
    sorted_counts = count_order(hashes, tokens, wbits)
    histogram = counts_from_histogram(np.bincount(tokens, minlength=50), wbits)
    for name in ("pair_keys", "pair_counts", "ctx_keys", "ctx_counts", "ctx_start"):
        np.testing.assert_array_equal(getattr(sorted_counts, name), getattr(histogram, name))


def test_bad_input_is_named(tmp_path):
    corpus = zipf_corpus(20, 30, seed=5)
    with pytest.raises(ValueError, match="token ids must lie in"):
        NGramModel(2, 10, memory_budget="1MiB", spill_dir=tmp_path).fit(corpus.tokens, corpus.offsets)
    with pytest.raises(ValueError, match="offsets must rise"):
        NGramModel(2, 30, memory_budget="1MiB").fit(corpus.tokens, corpus.offsets[:-1])
    with pytest.raises(ValueError, match="no tokens to count"):
        NGramModel(2, 30, memory_budget="1MiB").fit(
            corpus.tokens, corpus.offsets, np.zeros(len(corpus.tokens), bool)
        )
    with pytest.raises(ValueError, match="count_workers"):
        NGramModel(2, 30, memory_budget="1MiB", count_workers=0).fit(corpus.tokens, corpus.offsets)


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30)
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", 0, "2 GiBs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_bytes(bad)
