"""Proxy-KD's weighting of the posterior term (``loss.posterior_kl.weighting=proxy_agreement``): the weights'
definition, the store they come from, and a student trained with them. The property tests
(``test_loss_properties``) run every weightable divergence under this weighting on every target form and
through the chunked and fused paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lightning.data.batch import IGNORE_INDEX, PositionBatch, SoftLabels
from kd_lightning.data.soft_labels import SoftLabelStore
from kd_lightning.data.store_size import META_BYTES
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.agreement import ProxyAgreementEstimator, observed_tokens
from kd_lightning.losses import ForwardKL
from kd_lightning.losses.terms import AGREEMENT_STORE, agreement_weights
from kd_lightning.models.builders import tiny_llama
from kd_lightning.stages.compare import proxies_over_seeds
from tests.helpers.batches import position_batch
from tests.helpers.cli import artifacts, kdl

V = 11


def batch_with(agreement: list[float], targets: list[int]) -> PositionBatch:
    """A packed batch of len(targets) positions with a dense-ish posterior and the agreement store."""
    n = len(targets)
    g = torch.Generator().manual_seed(0)
    probs, ids = torch.softmax(torch.randn(1, n, V, generator=g) * 2, -1).topk(4, dim=-1)
    target = torch.tensor([targets])
    return PositionBatch(
        target,
        {
            "posterior": SoftLabels(ids, probs, 1 - probs.sum(-1)),
            AGREEMENT_STORE: SoftLabels(
                target.clamp_min(0).unsqueeze(-1),
                torch.tensor(agreement).view(1, n, 1),
                1 - torch.tensor([agreement]),
            ),
        },
    )


def test_weighted_term_is_the_agreement_weighted_mean_of_per_position_kl():
    agreement = [0.9, 0.1, 0.5, 0.7, 0.3]
    batch = batch_with(agreement, [1, 2, IGNORE_INDEX, 4, 5])
    logits = torch.randn(1, 5, V)
    plain = ForwardKL("posterior")
    weighted = ForwardKL("posterior", weighting="proxy_agreement")
    assert weighted.soft_labels == ("posterior", AGREEMENT_STORE) and weighted.uses_batch_statistics
    per_position = [plain(logits[:, i : i + 1], batch.positions(slice(i, i + 1))) for i in range(5)]
    valid = [0, 1, 3, 4]
    mean_agreement = sum(agreement[i] for i in valid) / len(valid)
    expected = sum(agreement[i] / mean_agreement * per_position[i] for i in valid) / len(valid)
    torch.testing.assert_close(weighted(logits, batch), expected)
    assert not torch.allclose(weighted(logits, batch), plain(logits, batch))  # the weights do something
    weights = agreement_weights(batch)[0]
    assert weights[2] == 0 and weights[valid].mean().item() == pytest.approx(1.0)


def test_a_batch_where_the_proxy_never_agrees_counts_every_position_alike():
    batch = batch_with([0.0, 0.0, 0.0], [1, 2, 3])
    logits = torch.randn(1, 3, V)
    torch.testing.assert_close(
        ForwardKL("posterior", weighting="proxy_agreement")(logits, position_batch(batch)),
        ForwardKL("posterior")(logits, position_batch(batch)),
    )


def test_weighting_errors_name_the_fix():
    with pytest.raises(ValueError, match="weighting must be one of none, proxy_agreement"):
        ForwardKL("posterior", weighting="agreement")

    class OwnForward(ForwardKL):  # a user's term that rewrites forward and ignores the weights
        def forward(self, student_logits, batch):
            return student_logits.sum() * 0

    with pytest.raises(ValueError, match="declare weights_positions = True"):
        OwnForward("posterior", weighting="proxy_agreement")
    batch = batch_with([0.5, 0.5], [1, 2])
    del batch.soft_labels[AGREEMENT_STORE]
    with pytest.raises(KeyError, match="proxy_agreement"):
        ForwardKL("posterior", weighting="proxy_agreement")(torch.randn(1, 2, V), position_batch(batch))


def test_the_store_holds_the_proxys_probability_of_each_teacher_token(tmp_path):
    torch.manual_seed(0)
    proxy = tiny_llama(vocab_size=V).eval()
    tokens = np.array([3, 4, 5, 6, 7, 3, 8, 9, 1, 2], dtype=np.int32)
    corpus = TokenizedCorpus(tokens, np.array([0, 5, 10]), np.array([2, 3], dtype=np.int32))
    estimator = ProxyAgreementEstimator(batch_size=2, shard_size=1)
    estimator.estimate(proxy, corpus, 0, V, str(tmp_path / "agreement"), {"test": 1})
    store = SoftLabelStore(tmp_path / "agreement", expect={"test": 1}, vocab_size=V)
    assert len(store.all_rows().ids) == 3 + 2
    for i in range(len(corpus)):
        seq = torch.from_numpy(corpus.sequence(i).astype(np.int64))[None]
        with torch.no_grad():
            probs = torch.softmax(proxy(seq).logits[0].float(), -1)
        start = int(corpus.prompt_lens[i]) - 1
        targets = seq[0, start + 1 :]
        expected = probs[start : start + len(targets)].gather(-1, targets[:, None])[:, 0]
        rows = store.rows(i)
        assert rows.ids[:, 0].tolist() == targets.tolist() == observed_tokens(corpus, [i]).tolist()
        np.testing.assert_allclose(
            rows.probs[:, 0].astype(np.float32), expected.numpy(), rtol=2e-3, atol=1e-4
        )
        np.testing.assert_allclose(rows.tail, 1 - rows.probs[:, 0].astype(np.float32), atol=1e-3)


def test_kdl_trains_a_student_with_proxy_kd_weights(kdl_env):
    """weighting=proxy_agreement: the plan names the store, the stage builds it from the aligned proxy (one
    entry per position, 8 B), and the student trains from posterior + weights to a different result."""
    settings = ["experiment=tiny", "loss=[hard_ce,posterior_kl]", "trainer.max_steps=2"]
    weighted = [*settings, "loss.posterior_kl.weighting=proxy_agreement"]
    kdl("plan", *weighted, env_dir=kdl_env)
    plan = json.loads(sorted((kdl_env / "outputs").rglob("plan_result.json"))[-1].read_text())
    assert "proxy_agreement" in plan["store_bytes"] and plan["flops"]["proxy_agreement"] > 0
    kdl("distill", *weighted, env_dir=kdl_env)
    (folder,) = artifacts(kdl_env, "proxy_agreement")
    meta = json.loads((folder / "meta.json").read_text())
    assert (
        meta["provenance"]["proxy"]
        == json.loads((artifacts(kdl_env, "posterior")[0] / "meta.json").read_text())["provenance"]["proxy"]
    )
    arrays = sum(p.stat().st_size for p in folder.glob("*.npy"))  # meta.json: the plan allows 1 KB
    assert abs(plan["store_bytes"]["proxy_agreement"] - META_BYTES - arrays) / arrays < 0.05
    kdl("distill", *settings, env_dir=kdl_env)
    results = [json.loads((s / "result.json").read_text())["nll"] for s in artifacts(kdl_env, "distill")]
    assert len(results) == 2 and results[0] != results[1]


def test_pipeline_variants_with_their_own_alignment_read_their_own_proxy(kdl_env):
    """variants.<name>.alignment (Proxy-KD's SFT + DPO beside v1's SFT): each variant's posterior and agreement
    stores come from its own aligned proxy, and the proxy table has one row per alignment (plus one before),
    each named for this run even when its figures come from an earlier run's cache."""
    v1 = [
        "+alignment@variants.v1.alignment=sft",
        "+variants.v1.loss=[hard_ce,posterior_kl]",
        "loss.posterior_kl.weighting=proxy_agreement",
    ]
    kdl("pipeline", "experiment=tiny", "trainer.max_steps=2", *v1, env_dir=kdl_env)  # its proxy: "proxy"
    done = kdl(
        "pipeline",
        "experiment=tiny",
        "trainer.max_steps=2",
        "+variants.sft=[hard_ce]",
        *v1,
        "+alignment@variants.other.alignment=sft",
        "variants.other.alignment.learning_rate=1e-2",
        "+variants.other.loss=[hard_ce,posterior_kl]",
        env_dir=kdl_env,
    )
    assert len(artifacts(kdl_env, "align")) == 2 and len(artifacts(kdl_env, "posterior")) == 2
    assert len(artifacts(kdl_env, "proxy_agreement")) == 2 and len(artifacts(kdl_env, "distill")) == 3
    result = json.loads(sorted((kdl_env / "outputs").rglob("pipeline_result.json"))[-1].read_text())
    proxies = [row["name"] for row in result["rows"] if str(row.get("name", "")).startswith("proxy")]
    assert len(proxies) == 3 and sum("before alignment" in name for name in proxies) == 1, proxies
    assert (
        "proxy tiny0 [SFT, v1] (aligned)" in done.stdout
        and "proxy tiny0 [SFT, other] (aligned)" in done.stdout
    )


def test_proxies_over_seeds_average_each_alignment_across_its_seeds():
    rows = [
        {"name": "proxy m (before alignment)", "nll": 3.0},
        {"name": "proxy m [SFT, seed 0] (aligned)", "nll": 2.0},
        {"name": "proxy m [SFT + DPO, seed 0] (aligned)", "nll": 1.0},
        {"name": "proxy m [SFT, seed 1] (aligned)", "nll": 2.5},
        {"name": "proxy m [SFT + DPO, seed 1] (aligned)", "nll": 2.0},
    ]
    table = proxies_over_seeds(rows)
    assert "| proxy m [SFT] (aligned) | 2.2500 ± 0.3536 | 2 |" in table
    assert "| proxy m [SFT + DPO] (aligned) | 1.5000 ± 0.7071 | 2 |" in table
    assert "| proxy m (before alignment) | 3.0000 ± 0.0000 | 1 |" in table
    assert proxies_over_seeds(rows[:3]) is None  # one seed: nothing to average
