"""The n-gram prior: hand-computed counts, the γ mix, backoff, collision safety, speed-independent facts."""

from __future__ import annotations

import numpy as np
import pytest

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.ngram import NGramModel, NGramPriorEstimator, count_order, mix_prior


def corpus_of(seqs: list[list[int]], prompt_len: int = 1) -> TokenizedCorpus:
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, np.full(len(seqs), prompt_len, dtype=np.int32))


def dense(rows, vocab: int) -> np.ndarray:
    out = np.zeros((len(rows.ids), vocab))
    for r in range(len(rows.ids)):
        for i, p in zip(rows.ids[r], rows.probs[r]):
            out[r, int(i)] += float(p)
    return out


def test_bigram_counts_by_hand():
    # sequences (prompt token 9, then response). Bigram events over response tokens:
    # after 1: 2, 2, 3  -> p(2|1)=2/3, p(3|1)=1/3
    seqs = [[9, 1, 2], [9, 1, 2], [9, 1, 3]]
    corpus = corpus_of(seqs)
    response = np.roll(corpus.target_mask(), 1)
    model = NGramModel(order=2, vocab_size=10).fit(corpus.tokens, corpus.offsets, response)
    positions = np.array([2, 5, 8])  # the tokens after "1"
    rows, orders, _ = model.distributions(corpus.tokens, corpus.offsets, positions, top_k=4)
    d = dense(rows, 10)
    np.testing.assert_allclose(d[0, [2, 3]], [2 / 3, 1 / 3])
    np.testing.assert_allclose(d.sum(1) + rows.tail, 1.0)
    assert list(orders) == [2, 2, 2]


def test_prior_formula_matches_hand_computation_and_sums_to_one():
    seqs = [[9, 1, 2], [9, 1, 2], [9, 1, 3]]
    corpus = corpus_of(seqs)
    gamma = 4.0
    prior, _ = NGramPriorEstimator(ngram_order=2, gamma=gamma, min_context_count=1, top_k=4).estimate(
        corpus, 10
    )
    d = dense(prior, 10)
    # targets per sequence: position of "9"->1 and "1"->x; rows in order: (9→1), (1→2), (9→1), (1→2), (9→1), (1→3)
    row_1_to_3 = d[5]
    # p(3) = #(1,3)/(γ #(1)) + (γ-1)/γ ; p(2) = #(1,2)/(γ #(1))
    np.testing.assert_allclose(row_1_to_3[3], (1 / 3) / gamma + (gamma - 1) / gamma, atol=1e-3)
    np.testing.assert_allclose(row_1_to_3[2], (2 / 3) / gamma, atol=1e-3)
    np.testing.assert_allclose(d.sum(1) + prior.tail, 1.0, atol=2e-3)
    # sorted by probability, observed first here
    assert prior.ids[5, 0] == 3


def test_gamma_one_is_pure_ngram_and_large_gamma_is_one_hot():
    corpus = corpus_of([[9, 1, 2], [9, 1, 3]])
    pure, _ = NGramPriorEstimator(2, gamma=1.0, min_context_count=1, top_k=4).estimate(corpus, 10)
    np.testing.assert_allclose(dense(pure, 10)[1, [2, 3]], [0.5, 0.5], atol=1e-3)
    hard, _ = NGramPriorEstimator(2, gamma=1e6, min_context_count=1, top_k=4).estimate(corpus, 10)
    assert dense(hard, 10)[1, 2] == pytest.approx(1.0, abs=1e-3)


def test_backoff_to_shorter_context_when_context_unseen():
    counted = corpus_of([[9, 5, 1, 2], [9, 6, 1, 2], [9, 6, 1, 3]])
    # held-out sequence with a context (7, 1) never seen: trigram backs off to bigram p(.|1)
    heldout = corpus_of([[9, 7, 1, 2]])
    model = NGramModel(order=3, vocab_size=10).fit(
        counted.tokens, counted.offsets, np.roll(counted.target_mask(), 1)
    )
    rows, orders, _ = model.distributions(heldout.tokens, heldout.offsets, np.array([3]), top_k=4)
    assert orders[0] == 2
    np.testing.assert_allclose(dense(rows, 10)[0, [2, 3]], [2 / 3, 1 / 3], atol=1e-6)


def test_min_context_count_backs_off_rare_contexts():
    corpus = corpus_of([[9, 5, 1, 2], [9, 6, 1, 3], [9, 6, 1, 3]])
    model = NGramModel(order=3, vocab_size=10, min_context_count=2).fit(
        corpus.tokens, corpus.offsets, np.roll(corpus.target_mask(), 1)
    )
    rows, orders, _ = model.distributions(corpus.tokens, corpus.offsets, np.array([3, 7]), top_k=4)
    assert orders[0] == 2  # (5, 1) seen once -> bigram
    assert orders[1] == 3  # (6, 1) seen twice -> trigram
    np.testing.assert_allclose(dense(rows, 10)[1, 3], 1.0)


def test_unigram_backoff_when_nothing_matches():
    counted = corpus_of([[9, 1, 2], [9, 1, 2]])
    model = NGramModel(order=2, vocab_size=10).fit(
        counted.tokens, counted.offsets, np.roll(counted.target_mask(), 1)
    )
    unseen = corpus_of([[9, 4, 4]])
    rows, orders, _ = model.distributions(unseen.tokens, unseen.offsets, np.array([2]), top_k=4)
    assert orders[0] == 1
    d = dense(rows, 10)
    # unigram over counted response tokens {1: 2, 2: 2}; observed 4 unseen -> present with probability 0
    np.testing.assert_allclose(d[0, [1, 2]], [0.5, 0.5])
    assert 4 in rows.ids[0]


def test_observed_token_always_in_top_k():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 50, size=40)) for _ in range(30)]
    corpus = corpus_of(seqs)
    prior, _ = NGramPriorEstimator(ngram_order=1, gamma=1.0, top_k=2).estimate(corpus, 50)
    observed = corpus.tokens[np.flatnonzero(corpus.target_mask()) + 1]
    assert (prior.ids.astype(np.int64) == observed[:, None]).any(1).all()
    assert np.all(prior.tail >= 0)


def test_hash_prefix_collision_falls_back_to_exact_contexts():
    # two different full hashes with the same high bits: the packed key would merge them
    wbits = 4
    hashes = np.array([0x10, 0x11, 0x10, 0x11], dtype=np.uint64)  # same prefix after >> 4
    words = np.array([1, 2, 1, 2], dtype=np.uint64)
    counts = count_order(hashes, words, wbits)
    assert len(counts.moved_hashes) == 1  # one of the two clashing contexts got a fresh key
    assert len(counts.ctx_keys) == 2
    np.testing.assert_array_equal(counts.ctx_counts, [2, 2])
    keys, _ = counts.context_keys(np.array([0x10, 0x11], dtype=np.uint64))
    assert keys[0] != keys[1] and set(keys.tolist()) == set(counts.ctx_keys.tolist())


def test_context_keys_are_exact_for_short_contexts():
    """n <= 5 with a 16-bit vocabulary: distinct contexts never share a key (packing + bijective mix)."""
    from kd_lightning.estimation.ngram_counts import context_hashes

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49152, size=200_000).astype(np.int32)
    seq_pos = np.arange(len(tokens), dtype=np.int32)
    positions = np.arange(4, len(tokens))
    keys = context_hashes(tokens, seq_pos, positions, 4, 49152)
    contexts = np.stack([tokens[positions - j] for j in range(1, 5)], 1)
    assert len(np.unique(keys)) == len(np.unique(contexts, axis=0))


def test_mix_prior_rejects_gamma_below_one():
    corpus = corpus_of([[9, 1, 2]])
    with pytest.raises(ValueError, match="gamma"):
        NGramPriorEstimator(2, gamma=0.5)
    rows, _, _ = (
        NGramModel(2, 10)
        .fit(corpus.tokens, corpus.offsets)
        .distributions(corpus.tokens, corpus.offsets, np.array([2]), 2)
    )
    with pytest.raises(ValueError, match="gamma"):
        mix_prior(rows, np.array([2]), 0.9)


def test_token_out_of_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="token ids must lie"):
        NGramModel(2, vocab_size=5).fit(np.array([1, 7]), np.array([0, 2]))


def test_offsets_that_do_not_match_the_tokens_are_a_clear_error():
    with pytest.raises(ValueError, match="offsets must rise from 0 to len"):
        NGramModel(2, vocab_size=5).fit(np.array([1, 2, 3]), np.array([0, 2]))


def test_prior_quality_scores_held_out_text_by_hand():
    """Counted: prompt p, answer a b a b a c. Held out: prompt p, answer a b. A bigram (order 2) says
    p→a with 1, a→b with 2/3: top-1 right on both, mass (1 + 2/3)/2, NLL with the 1% unigram floor."""
    from kd_lightning.data.tokenized import TokenizedCorpus
    from kd_lightning.evaluation.prior_quality import (
        UNIGRAM_FLOOR,
        PriorQualitySpec,
        first_tokens,
        score_prior,
    )

    p, a, b, c = 0, 1, 2, 3
    counted = TokenizedCorpus(
        np.array([p, a, b, a, b, a, c], np.int32), np.array([0, 7]), np.array([1], np.int32)
    )
    heldout = TokenizedCorpus(np.array([p, a, b], np.int32), np.array([0, 3]), np.array([1], np.int32))
    spec = PriorQualitySpec(ngram_orders=[2], counted_tokens=[None], min_context_count=1, memory_budget=None)
    row = score_prior(counted, heldout, 4, 2, spec)
    unigram = np.array([0, 3, 2, 1]) + 1.0
    unigram /= unigram.sum()
    nll = -np.mean(np.log((1 - UNIGRAM_FLOOR) * np.array([1.0, 2 / 3]) + UNIGRAM_FLOOR * unigram[[a, b]]))
    assert row["top1_agreement"] == 1.0 and row["coverage"] == 1.0 and row["heldout_tokens"] == 2
    assert row["mass_on_observed"] == pytest.approx((1 + 2 / 3) / 2)
    assert row["nll"] == pytest.approx(nll) and row["counted_tokens"] == 6
    two = TokenizedCorpus(
        np.concatenate([counted.tokens, counted.tokens]), np.array([0, 7, 14]), np.array([1, 1], np.int32)
    )
    assert (
        len(first_tokens(two, 6)) == 1 and len(first_tokens(two, 7)) == 2 and first_tokens(two, None) is two
    )
