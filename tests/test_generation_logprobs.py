"""An API teacher's top-k log-probs become a soft-label store aligned to the student's tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kd_lightning.data.records import Record, write_jsonl
from kd_lightning.data.soft_labels import id_dtype_for
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.generation.logprobs import aligned_rows, build_logprob_store
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.models.vocabulary import token_text_ids
from tests.helpers.cli import artifacts, kdl


def entry(token: str, p: float, *top: tuple[str, float]) -> dict:
    return {"token": token, "logprob": math.log(p), "top": [[t, math.log(q)] for t, q in top]}


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_aligned_positions_carry_the_teacher_distribution(tokenizer):
    table = token_text_ids(tokenizer, skip_special=True)
    ids = [table[c] for c in "ab c"]
    teacher = [  # the API's text starts with a space the corpus stripped
        entry(" ", 0.5, (" ", 0.5), ("x", 0.2)),
        entry("a", 0.6, ("a", 0.6), ("b", 0.3), ("zz", 0.05)),  # "zz" is no student token → tail
        entry("b", 0.9, ("b", 0.9)),
        entry(" ", 0.7, (" ", 0.7), ("q", 0.1)),
        entry("d", 0.4, ("d", 0.4), ("c", 0.35)),  # the student's text says "c": no alignment here
    ]
    rows, aligned = aligned_rows(ids, teacher, tokenizer, table, 3, id_dtype_for(len(tokenizer)))
    assert aligned.tolist() == [True, True, True, False]  # the last position did not align: no evidence
    dense = rows.to_dense(len(tokenizer)).numpy()
    assert dense[0, table["a"]] == pytest.approx(0.6, abs=1e-3) and dense[0, table["b"]] == pytest.approx(
        0.3, abs=1e-3
    )
    assert rows.tail[0] == pytest.approx(0.1, abs=1e-3)
    assert dense[1, table["b"]] == pytest.approx(0.9, abs=1e-3) and rows.tail[1] == pytest.approx(
        0.1, abs=1e-3
    )
    assert dense[2, table[" "]] == pytest.approx(0.7, abs=1e-3)
    assert rows.ids[3, 0] == table["c"] and rows.probs[3, 0] == 1.0 and rows.tail[3] == 0.0
    assert np.allclose(dense.sum(1), 1.0, atol=2e-3)


def test_store_has_a_row_per_target_position_and_one_hot_where_no_evidence(tokenizer, tmp_path):
    records = [Record("count 2 from 1.", "12"), Record("say hi.", "hi")]
    corpus = tokenize_records(records, tokenizer, 64)
    table = token_text_ids(tokenizer, skip_special=True)
    logprobs = {records[0].key: [entry("1", 0.8, ("1", 0.8), ("2", 0.1)), entry("2", 0.5, ("2", 0.5))]}
    store, stats = build_logprob_store(corpus, logprobs, tokenizer, tmp_path / "s", {"t": 1}, len(tokenizer))
    assert len(store.tail) == int(corpus.target_offsets()[-1])
    assert stats["sequences_with_logprobs"] == 1 and stats["aligned_positions"] == 2
    first = store.rows(0)
    assert first.ids[0, 0] == table["1"] and float(first.probs[0, 0]) == pytest.approx(0.8, abs=1e-3)
    second = store.rows(1)
    targets = corpus.sequence(1)[corpus.prompt_lens[1] :]
    assert (second.ids[:, 0] == targets).all() and (second.probs[:, 0] == 1).all()


def test_distill_on_teacher_logprobs_from_the_cli(kdl_env, tiny_dir):
    records = [Record(f"say something about item {i}.", f"item {i} is nice") for i in range(24)]
    write_jsonl(records, kdl_env / "corpus.jsonl")
    table = token_text_ids(load_tokenizer(tiny_dir), skip_special=True)
    with (kdl_env / "logprobs.jsonl").open("w") as handle:
        for r in records[:12]:
            tokens = [entry(c, 0.7, (c, 0.7), ("e", 0.2)) for c in r.response]
            assert all(c in table for c in r.response)
            handle.write(json.dumps({"key": r.key, "tokens": tokens}) + "\n")
    common = [
        "experiment=tiny",
        "data.path=corpus.jsonl",
        "data.logprobs=logprobs.jsonl",
        "trainer.max_epochs=1",
    ]
    kdl("distill", *common, "kd_target=teacher_logprobs", "loss=[hard_ce,forward_kl]", env_dir=kdl_env)
    (store,) = artifacts(kdl_env, "teacher_logprobs")
    stats = json.loads(store.with_suffix(".stats.json").read_text())
    assert stats["sequences_with_logprobs"] > 0 and stats["aligned_positions"] > 0
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert set(result["terms"]) == {"hard_ce", "forward_kl"} and result["nll"] > 0
    done = kdl(
        "distill",
        "experiment=tiny",
        "kd_target=teacher_logprobs",
        "loss=[forward_kl]",
        env_dir=kdl_env,
        check=False,
    )
    assert done.returncode == 1 and "need data.logprobs" in done.stderr


def test_a_posterior_counts_the_apis_log_probs_where_they_aligned(kdl_env, tiny_dir):
    """kdl posterior with api_evidence_weight: the rows of records with API log-probs change (toward the
    API's answer), every other row stays the posterior without evidence."""
    records = [Record(f"say something about item {i}.", f"item {i} is nice") for i in range(24)]
    write_jsonl(records, kdl_env / "corpus.jsonl")
    with (kdl_env / "logprobs.jsonl").open("w") as handle:
        for r in records[:12]:
            tokens = [entry(c, 0.7, (c, 0.7), ("e", 0.2)) for c in r.response]
            handle.write(json.dumps({"key": r.key, "tokens": tokens}) + "\n")
    common = [
        "experiment=tiny",
        "data.path=corpus.jsonl",
        "data.logprobs=logprobs.jsonl",
        "estimator/posterior=expected_counts",
    ]
    kdl("posterior", *common, env_dir=kdl_env)
    kdl("posterior", *common, "estimator.posterior.api_evidence_weight=50", env_dir=kdl_env)
    from kd_lightning.data.soft_labels import SoftLabelStore

    stores = {
        json.loads((f / "meta.json").read_text())["provenance"]["estimator"].get(
            "api_evidence_weight", 0
        ): SoftLabelStore(f)
        for f in artifacts(kdl_env, "posterior")
    }
    (evidence,) = artifacts(kdl_env, "teacher_logprobs")
    api = SoftLabelStore(evidence)
    vocab = len(load_tokenizer(tiny_dir))
    changed = unchanged = closer_rows = 0
    for seq in range(len(api)):
        present = api.evidence(seq)
        plain, counted = stores[0].rows(seq), stores[50.0].rows(seq)
        dense_plain, dense_counted = plain.to_dense(vocab), counted.to_dense(vocab)
        dense_api = api.rows(seq).to_dense(vocab)
        for row in range(len(present)):
            if present[row]:
                changed += 1  # pulled toward the API's answer
                closer = (dense_counted[row] - dense_api[row]).abs().sum()
                before = (dense_plain[row] - dense_api[row]).abs().sum()
                assert closer <= before + 1e-3
                closer_rows += bool(closer < 0.5 * before)  # λ = 50 pseudo-counts against κ + R = 12
            else:
                unchanged += 1
                torch.testing.assert_close(dense_counted[row], dense_plain[row], atol=2e-3, rtol=0)
    assert changed and unchanged and closer_rows == changed


def test_fidelity_scores_the_apis_top_k_and_the_posterior_that_counts_it(kdl_env, tiny_dir):
    """An open teacher's own top-5 as the "API" log-probs: kdl fidelity adds the API alone and the posterior
    per λ; the more the API counts, the closer the posterior comes to the teacher."""
    import csv

    from kd_lightning.models.loading import load_causal_lm

    tokenizer = load_tokenizer(tiny_dir)
    teacher = load_causal_lm(tiny_dir)
    records = [
        Record(f"say something about item {i}.", f"item {i} is nice and {i % 3} more") for i in range(24)
    ]
    write_jsonl(records, kdl_env / "corpus.jsonl")
    corpus = tokenize_records(records, tokenizer, 96)
    with (kdl_env / "logprobs.jsonl").open("w") as handle, torch.no_grad():
        for i, record in enumerate(records):
            ids, start = torch.as_tensor(corpus.sequence(i)).long(), int(corpus.prompt_lens[i])
            log_probs = torch.log_softmax(teacher(input_ids=ids[None]).logits[0].float(), -1)
            tokens = []
            for j, char in enumerate(record.response):  # one character per token in the tiny vocabulary
                assert tokenizer.decode([int(ids[start + j])]) == char
                row = log_probs[start + j - 1]
                top = row.topk(5)
                tokens.append(
                    {
                        "token": char,
                        "logprob": float(row[ids[start + j]]),
                        "top": [
                            [tokenizer.decode([int(t)]), float(v)] for v, t in zip(top.values, top.indices)
                        ],
                    }
                )
            handle.write(json.dumps({"key": record.key, "tokens": tokens}) + "\n")
    kdl("fidelity", "experiment=tiny", "data=jsonl", "data.path=corpus.jsonl", "data.logprobs=logprobs.jsonl",
        "proxy=local", f"proxy.path={tiny_dir}", "teacher=local", f"teacher.path={tiny_dir}",
        "fidelity.records=6", "fidelity.ngram_orders=[3]", "fidelity.gammas=[2]", "fidelity.sampling_rounds=[4]",
        "fidelity.label_smoothing=[]", "fidelity.api_evidence_weights=[1,100]", "fidelity.top_k=3",
        "estimator.posterior.sampling_rounds=4", env_dir=kdl_env)  # fmt: skip
    out = next((kdl_env / "outputs").rglob("fidelity.csv"))
    with out.open() as handle:
        kl = {row["estimate"]: float(row["kl"]) for row in csv.DictReader(handle)}
    assert {"API top-K alone", "posterior R=4 + API λ=1", "posterior R=4 + API λ=100"} <= set(kl)
    plain = next(v for k, v in kl.items() if k.startswith("posterior R=4 (prior"))
    assert kl["posterior R=4 + API λ=100"] < kl["posterior R=4 + API λ=1"] < plain
    assert kl["API top-K alone"] < plain
    refused = kdl("fidelity", "experiment=tiny", "data=jsonl", "data.path=corpus.jsonl", "teacher=local",
                  f"teacher.path={tiny_dir}", "fidelity.api_evidence_weights=[4]", env_dir=kdl_env, check=False)  # fmt: skip
    assert refused.returncode == 1 and "data.logprobs" in refused.stderr.strip().splitlines()[-1]
