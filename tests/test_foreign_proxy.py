"""Closed-source posterior with a proxy of another tokenizer: draws mapped into the student's vocabulary by
text, unaligned positions keep the prior, and a same-tokenizer proxy gives exactly today's stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.cross_tokenizer import teacher_view
from kd_lightning.data.soft_labels import SparseRows
from kd_lightning.data.token_alignment import first_token_map, token_strings
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.posterior import ExpectedCountsUpdate, ProxyPosteriorEstimator
from kd_lightning.models.builders import tiny_llama
from tests.helpers.tokenizers import RECORDS, byte_fallback_tokenizer, byte_level_tokenizer

V = 23


def sparse_prior(n: int, seed: int = 0) -> SparseRows:
    g = torch.Generator().manual_seed(seed)
    return SparseRows.from_dense(
        torch.softmax(torch.randn(n, V, generator=g) * 2, -1), 6, np.dtype(np.uint16)
    )


@pytest.mark.parametrize("update", [None, ExpectedCountsUpdate(4.0)])
def test_identity_mapping_equals_the_shared_vocabulary_rows(update):
    estimator = ProxyPosteriorEstimator(update=update, sampling_rounds=8, top_k=6)
    prior = sparse_prior(10)
    probs = torch.softmax(torch.randn(10, V, generator=torch.Generator().manual_seed(1)), -1)
    shared = estimator.posterior_rows(prior, probs, torch.Generator().manual_seed(7))
    mapped = estimator.mapped_posterior_rows(
        prior, probs, torch.arange(10), torch.arange(V), V, torch.Generator().manual_seed(7)
    )
    assert np.array_equal(shared.ids, mapped.ids)
    np.testing.assert_allclose(shared.probs, mapped.probs, atol=1e-6)
    np.testing.assert_allclose(shared.tail, mapped.tail, atol=1e-6)


def test_draws_move_to_the_student_token_and_unaligned_rows_keep_the_prior():
    estimator = ProxyPosteriorEstimator(update=ExpectedCountsUpdate(4.0), sampling_rounds=8, top_k=V)
    prior = sparse_prior(3)
    proxy_vocab = 40
    probs = torch.zeros(2, proxy_vocab)
    probs[0, 31], probs[1, 5] = 1.0, 1.0  # proxy token 31 maps to student 9; token 5 has no string
    table = torch.full((proxy_vocab,), -1, dtype=torch.long)
    table[31] = 9
    rows = estimator.mapped_posterior_rows(
        prior, probs, torch.tensor([0, -1, 1]), table, V, torch.Generator().manual_seed(0)
    )
    dense, before = rows.to_dense(V), prior.to_dense(V)
    expected = (4.0 * before[0] + 8.0 * torch.nn.functional.one_hot(torch.tensor(9), V)) / 12.0
    torch.testing.assert_close(dense[0], expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dense[1], before[1], atol=1e-3, rtol=1e-3)  # not aligned: the prior
    torch.testing.assert_close(dense[2], before[2], atol=1e-3, rtol=1e-3)  # no draw had a string


def test_first_token_map_starts_each_string():
    student, proxy = byte_level_tokenizer(400), byte_fallback_tokenizer(450)
    table = first_token_map(student, proxy)
    strings, s_strings = token_strings(proxy), token_strings(student)
    assert table.shape == (len(proxy),)
    mapped = [v for v in range(len(proxy)) if table[v] >= 0 and strings[v]]
    assert len(mapped) > 100
    for v in mapped:
        assert strings[v].startswith(s_strings[table[v]]), (strings[v], s_strings[table[v]])
    assert table[proxy.eos_token_id] == student.eos_token_id


def test_mapped_estimate_writes_student_layout_rows(tmp_path):
    """End to end through the sharded writer: rows in the student's layout, over its vocabulary."""
    from kd_lightning.data.cross_tokenizer import MappedProxy
    from kd_lightning.data.soft_labels import write_store

    student, proxy_tok = byte_level_tokenizer(400), byte_fallback_tokenizer(450)
    corpus = tokenize_records(RECORDS, student, 256)
    view = teacher_view(corpus, {r.key: r for r in RECORDS}, student, proxy_tok, 256)
    rows = int(corpus.target_offsets()[-1])
    g = torch.Generator().manual_seed(0)
    prior_rows = SparseRows.from_dense(
        torch.softmax(torch.randn(rows, 400, generator=g), -1), 8, np.dtype(np.uint16)
    )
    prior = write_store(tmp_path / "prior", prior_rows, corpus.target_offsets(), {"kind": "test"})
    estimator = ProxyPosteriorEstimator(sampling_rounds=4, top_k=8, shard_size=2, batch_size=2)
    mapped = MappedProxy(view, first_token_map(student, proxy_tok), 400)
    store = estimator.estimate(
        tiny_llama(len(proxy_tok)), corpus, prior, 0, str(tmp_path / "post"), {"kind": "posterior"}, mapped
    )
    assert np.array_equal(store.offsets, corpus.target_offsets())
    unaligned = view.teacher_positions < 0
    assert unaligned.any()
    got = SparseRows(np.asarray(store.ids), np.asarray(store.probs), np.asarray(store.tail))
    np.testing.assert_allclose(
        got.to_dense(400)[torch.from_numpy(unaligned)].numpy(),
        prior_rows.to_dense(400)[torch.from_numpy(unaligned)].numpy(),
        atol=2e-3,
    )


def test_kdl_posterior_with_a_proxy_of_another_tokenizer(kdl_env, tiny_dir):
    """From the command line: proxy.own_tokenizer=true aligns and samples a proxy whose vocabulary orders the
    characters differently (every id moves), and the stored rows are the hand-built posterior: the aligned
    proxy's distribution at each position, moved back to the student's ids character by character, mixed
    with the prior (expected counts: no sampling noise). With the student's own tokenizer the setting
    changes nothing (the same store)."""
    import json

    from kd_lightning.data.datamodule import SoftLabelDataset, collate
    from kd_lightning.data.soft_labels import SoftLabelStore
    from kd_lightning.data.tokenized import TokenizedCorpus
    from kd_lightning.models.forward import target_position_logits
    from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
    from kd_lightning.models.tiny_assets import char_tokenizer
    from tests.helpers.cli import artifacts, kdl

    kdl("posterior", "experiment=tiny", env_dir=kdl_env)
    kdl("posterior", "experiment=tiny", "proxy.own_tokenizer=true", env_dir=kdl_env)
    (shared,) = artifacts(kdl_env, "posterior")  # same tokenizer: exactly the store of the shared path
    tokenizer = char_tokenizer(specials_first=False)
    folder = kdl_env / "foreign_proxy"
    tiny_llama(len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    foreign = ["proxy=local", f"proxy.path={folder}", "estimator/posterior=expected_counts"]
    foreign += ["estimator.posterior.sampling_rounds=4", "estimator.posterior.top_k=8"]
    refused = kdl("posterior", "experiment=tiny", *foreign, env_dir=kdl_env, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "uses a different tokenizer" in refused.stderr and "proxy.own_tokenizer=true" in refused.stderr
    kdl("posterior", "experiment=tiny", *foreign, "proxy.own_tokenizer=true", env_dir=kdl_env)
    (mapped,) = [f for f in artifacts(kdl_env, "posterior") if f != shared]
    store = SoftLabelStore(mapped)
    # the hand-built expectation
    student_tok = load_tokenizer(tiny_dir)
    to_proxy = {i: tokenizer.get_vocab()[t] for t, i in student_tok.get_vocab().items()}
    to_student = torch.tensor(
        [student_tok.get_vocab()[t] for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])]
    )
    (corpus_dir,) = artifacts(kdl_env, "corpus")
    train = TokenizedCorpus.load(corpus_dir / "train")
    meta = json.loads((mapped / "meta.json").read_text())["provenance"]
    (proxy_dir,) = [a for a in artifacts(kdl_env, "align") if a.name == meta["proxy"]]
    proxy = freeze(load_causal_lm(proxy_dir / "model"))
    prior = SoftLabelStore(next(a for a in artifacts(kdl_env, "prior")))
    kappa, rounds, vocab = 8.0, 4, len(student_tok)
    no_text = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]  # EOS ends: it maps
    for seq in range(len(train)):
        ids = torch.tensor([to_proxy[int(i)] for i in train.sequence(seq)])
        proxied = TokenizedCorpus(
            ids.numpy().astype(np.int32), np.array([0, len(ids)]), train.prompt_lens[seq : seq + 1]
        )
        batch = collate([SoftLabelDataset(proxied)[0]], pad_id=0)
        with torch.no_grad():
            logits = target_position_logits(proxy, batch.input_ids, batch.attention_mask, batch.target_mask)
        p_proxy = torch.softmax(logits.float(), -1)
        p_proxy[:, no_text] = 0.0  # special tokens spell no text: their draws are dropped
        counts = rounds * torch.zeros(len(p_proxy), vocab).index_add_(1, to_student, p_proxy)
        rows = prior.rows(seq)
        expected = kappa * SparseRows(rows.ids, rows.probs, rows.tail).to_dense(vocab) + counts
        expected /= kappa + counts.sum(-1, keepdim=True)
        got = store.rows(seq)
        stored = torch.from_numpy(got.ids.astype(np.int64))
        np.testing.assert_allclose(
            got.probs.astype(np.float32), expected.gather(1, stored).numpy(), atol=2e-3
        )
        top = expected.topk(8, -1).values
        np.testing.assert_allclose(np.sort(got.probs.astype(np.float32), -1)[:, ::-1], top.numpy(), atol=2e-3)
    assert len(artifacts(kdl_env, "align")) == 2
