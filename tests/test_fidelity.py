"""``kdl fidelity``: estimates of an open teacher scored against its true distributions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.evaluation.fidelity import Estimate, FidelitySpec, score_estimates
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from tests.helpers.cli import kdl


def teacher_rows(model, corpus, pad_id):
    from kd_lightning.data.datamodule import SoftLabelDataset, collate

    ds = SoftLabelDataset(corpus)
    batch = collate([ds[i] for i in range(len(corpus))], pad_id)
    mask = batch.target_ids != -100
    return torch.softmax(target_position_logits(model, batch.input_ids, batch.attention_mask, mask), -1)


def test_the_truth_scores_zero_and_one_hot_scores_worst(tiny_dir):
    model, tok = freeze(load_causal_lm(tiny_dir)), load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:5], tok, 96)
    vocab = len(tok)
    truth = teacher_rows(model, corpus, tok.pad_token_id)[:, :vocab]
    estimates = [
        Estimate("truth", {}, lambda observed: lambda rows: truth[rows]),
        Estimate(
            "one-hot",
            {},
            lambda observed: lambda rows: torch.nn.functional.one_hot(observed[rows], vocab).float(),
        ),
        Estimate(
            "uniform",
            {},
            lambda observed: lambda rows: torch.full((rows.stop - rows.start, vocab), 1 / vocab),
        ),
    ]
    rows, arrays = score_estimates(model, corpus, tok.pad_token_id, vocab, estimates, top_k=3, batch_size=2)
    by = {r["estimate"]: r for r in rows}
    assert by["truth"]["kl"] == pytest.approx(0, abs=1e-5) and by["truth"]["tv"] == pytest.approx(0, abs=1e-5)
    assert by["truth"]["topk_recall"] == 1.0 and by["truth"]["positions"] == len(truth)
    assert by["one-hot"]["kl"] > by["uniform"]["kl"] > 0  # the floored one-hot pays for the mass it misses
    # per-position arrays line up with the summary
    assert arrays["one-hot/tv"].shape == (len(truth),)
    assert float(np.mean(arrays["uniform/kl"])) == pytest.approx(by["uniform"]["kl"], rel=1e-5)
    # batching does not move rows: one batch gives the same per-position values
    _, again = score_estimates(model, corpus, tok.pad_token_id, vocab, estimates, top_k=3, batch_size=5)
    np.testing.assert_allclose(again["uniform/kl"], arrays["uniform/kl"], rtol=1e-4, atol=1e-6)


def test_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="gammas must be >= 1"):
        FidelitySpec(gammas=[0.5])
    with pytest.raises(ValueError, match="records"):
        FidelitySpec(records=0)


def test_cli_scores_every_estimate_and_writes_files(kdl_env, tiny_dir):
    done = kdl(
        "fidelity",
        "experiment=tiny",
        "data=jsonl",
        "proxy=local",
        f"proxy.path={tiny_dir}",
        "teacher=local",
        f"teacher.path={tiny_dir}",
        "fidelity.records=6",
        "fidelity.ngram_orders=[2,3]",
        "fidelity.gammas=[1,4]",
        "fidelity.sampling_rounds=[1,8]",
        "fidelity.top_k=3",
        env_dir=kdl_env,
    )
    assert "| one-hot |" in done.stdout and "| posterior R=8" in done.stdout
    out = next((kdl_env / "outputs").rglob("fidelity_result.json")).parent
    with (out / "fidelity.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = [r["estimate"] for r in rows]
    assert names[:2] == ["one-hot", "label smoothing ε=0.1"] and len(names) == 2 + 4 + 2
    kl = {r["estimate"]: float(r["kl"]) for r in rows}
    assert all(kl[name] < kl["one-hot"] for name in names[1:])  # every soft estimate beats hard labels
    # γ → large moves the prior towards the one-hot label: its TV approaches one-hot's
    tv = {r["estimate"]: float(r["tv"]) for r in rows}
    assert abs(tv["prior n=3 γ=4"] - tv["one-hot"]) < abs(tv["prior n=3 γ=1"] - tv["one-hot"])
    positions = np.load(out / "fidelity_positions.npz")
    assert positions["one-hot/kl"].shape == (int(rows[0]["positions"]),)
    result = json.loads((out / "fidelity_result.json").read_text())
    assert result["rows"][0]["estimate"] == "one-hot"


def test_cli_without_a_teacher_is_a_one_line_error(kdl_env):
    done = kdl("fidelity", "experiment=tiny", "data=jsonl", "~teacher", env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "needs the open teacher" in done.stderr and "Traceback" not in done.stderr
