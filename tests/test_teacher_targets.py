"""Offline white-box teacher: ``kdl teacher-logits`` stores, their contents, and distilling from them."""

from __future__ import annotations

import json

import numpy as np
import torch

from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.store_format import StoreFormat, StoreWrite
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.stores import formatted
from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from tests.helpers.cli import artifacts, kdl


def corpus_and_teacher(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:10], tok, 96)
    return corpus, freeze(load_causal_lm(tiny_dir)), tok.pad_token_id


def teacher_rows(teacher, corpus, pad_id, seq):
    batch = collate([SoftLabelDataset(corpus)[seq]], pad_id)
    mask = batch.target_ids != IGNORE_INDEX
    with torch.no_grad():
        return target_position_logits(teacher, batch.input_ids, batch.attention_mask, mask)


def test_topk_store_holds_the_teachers_top_k(tiny_dir, tmp_path):
    corpus, teacher, pad_id = corpus_and_teacher(tiny_dir)
    store = TeacherTargetBuilder("topk", k=5, batch_size=3, shard_size=4).estimate(
        teacher, corpus, pad_id, str(tmp_path / "store"), {"test": 1}
    )
    assert len(store) == len(corpus)
    for seq in (0, 7):
        probs = torch.softmax(teacher_rows(teacher, corpus, pad_id, seq), -1)
        values, ids = probs.topk(5, -1)
        rows = store.rows(seq)
        np.testing.assert_array_equal(rows.ids.astype(np.int64), ids.numpy())
        np.testing.assert_allclose(rows.probs.astype(np.float32), values.numpy(), atol=1e-3)
        np.testing.assert_allclose(rows.tail, 1 - values.sum(-1).numpy(), atol=1e-5)


def test_sampled_store_is_normalised_reproducible_and_follows_the_teacher(tiny_dir, tmp_path):
    corpus, teacher, pad_id = corpus_and_teacher(tiny_dir)
    with torch.no_grad():  # a peaked teacher (logits ×8), where following it and not following it differ
        teacher.model.norm.weight.mul_(8.0)
    k = 256
    build = TeacherTargetBuilder("sampled", k=k, shard_size=4, seed=3)
    a = build.estimate(teacher, corpus, pad_id, str(tmp_path / "a"), {"test": 1})
    b = build.estimate(teacher, corpus, pad_id, str(tmp_path / "b"), {"test": 1})
    rows = a.rows(1)
    np.testing.assert_allclose(rows.probs.astype(np.float32).sum(-1), 1.0, atol=1e-3)
    assert (rows.tail == 0).all()
    np.testing.assert_array_equal(rows.ids, b.rows(1).ids)  # same seed → same draws
    fewer = TeacherTargetBuilder("sampled", k=48, shard_size=4, seed=3)  # compact: exact counts, no K slots
    fixed = fewer.estimate(teacher, corpus, pad_id, str(tmp_path / "c"), {"test": 1})
    compact = fewer.estimate(
        teacher,
        corpus,
        pad_id,
        str(tmp_path / "d"),
        formatted({"test": 1}, counts_48 := StoreWrite(StoreFormat("counts", 1e-3, True), 48)),
        write=counts_48,
    )
    assert compact.encoding["probabilities"] == "counts" and compact.nbytes() < fixed.nbytes() / 2
    want, got = fixed.all_rows(), compact.all_rows()
    np.testing.assert_array_equal(got.ids[got.probs > 0], want.ids[want.probs > 0])
    np.testing.assert_array_equal(got.probs[got.probs > 0] * 48, np.rint(want.probs[want.probs > 0] * 48.0))
    probs = torch.softmax(teacher_rows(teacher, corpus, pad_id, 1), -1)
    assert probs.max(-1).values.mean() > 0.5  # peaked indeed
    dense = torch.zeros_like(probs).scatter_add_(
        -1, torch.from_numpy(rows.ids.astype(np.int64)), torch.from_numpy(rows.probs.astype(np.float32))
    )
    ours = float((dense - probs).abs().sum(-1).mean())
    # the same number of draws from a sampler that ignores the teacher (uniform over the vocabulary)
    generator = torch.Generator().manual_seed(0)
    uniform_ids = torch.randint(0, probs.shape[-1], (probs.shape[0], k), generator=generator)
    uniform = torch.zeros_like(probs).scatter_add_(-1, uniform_ids, torch.full(uniform_ids.shape, 1.0 / k))
    ignoring = float((uniform - probs).abs().sum(-1).mean())
    argmax = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)  # top-1 only
    greedy = float((argmax - probs).abs().sum(-1).mean())
    bound = 0.5  # 256 draws of this teacher land ~0.22 from it in L1; uniform ~1.9, top-1 only ~0.83
    assert ours < bound < min(ignoring, greedy), (ours, ignoring, greedy)


def test_cli_builds_the_store_once_and_distils_from_it_without_an_online_teacher(kdl_env, tiny_dir):
    common = ["experiment=tiny", "teacher=local", f"teacher.path={tiny_dir}", "estimator.teacher_targets.k=8"]
    kdl("teacher-logits", *common, env_dir=kdl_env)
    stores = artifacts(kdl_env, "teacher_logits")
    assert len(stores) == 1
    meta = json.loads((stores[0] / "meta.json").read_text())
    assert meta["provenance"]["targets"] == {"kind": "topk", "k": 8, "batch_size": 8, "shard_size": 64}
    kdl("distill", *common, "kd_target=offline_teacher", "loss=[hard_ce,forward_kl]", env_dir=kdl_env)
    assert artifacts(kdl_env, "teacher_logits") == stores  # reused, not rebuilt
    assert not artifacts(kdl_env, "prior") and not artifacts(kdl_env, "posterior")
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert set(result["terms"]) == {"hard_ce", "forward_kl"} and result["nll"] > 0


def test_teacher_logits_without_a_teacher_is_a_one_line_error(kdl_env):
    done = kdl("teacher-logits", "experiment=tiny", env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "needs an open teacher" in done.stderr and "Traceback" not in done.stderr


def test_distilbert_recipe_runs_from_the_cli(kdl_env, tiny_dir):
    kdl(
        "distill",
        "experiment=tiny",
        "recipe=distilbert",
        "teacher=local",
        f"teacher.path={tiny_dir}",
        "loss.hidden_cosine.layer_map=[[-1,-1]]",
        env_dir=kdl_env,
    )
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert result["terms"] == {"hard_ce": 2.0, "hinton_kl": 5.0, "hidden_cosine": 1.0}
