"""Using kd_lightning as a library: opt-in fast paths, token 0 in sparse rows, blank environment
settings, hub ids from an offline cache, and code fingerprints in cache keys."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.code_fingerprint import code_closure, code_fingerprint, targets_in
from kd_lightning.data.batch import BatchFormWarning, PositionBatch, SoftLabels
from kd_lightning.data.soft_labels import SparseRows
from kd_lightning.environment import drop_blank_environment, env_setting
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.losses.chunked import chunked_terms
from kd_lightning.losses.divergences import kl_buckets
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.losses.fused_sparse import fusable, fused_sparse_terms
from kd_lightning.losses.terms import DivergenceTerm, LossTerm
from kd_lightning.models.hub import resolve_model_path
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.models.shipped import AssetError
from kd_lightning.modules.distill import DistillModule
from tests.helpers.batches import position_batch

N, V, K = 12, 30, 5


class ScaledForwardKL(ForwardKL):
    """A user's subclass that rewrites ``forward``: fast paths must not stand in for it."""

    def forward(self, student_logits, batch):
        return 3.0 * super().forward(student_logits, batch) + 0.25


class PerPositionOnly(DivergenceTerm):
    """Only ``per_position``: still a masked mean of per-position values, so chunkable; never fused."""

    def per_position(self, log_p, log_q):
        return kl_buckets(log_p, log_q) + kl_buckets(log_q, log_p)


class RedeclaredForwardKL(ForwardKL):
    """Overrides ``forward`` with the same maths and declares the fused form again, explicitly."""

    fused_sparse_kind = "forward_kl"
    chunkable = True

    def forward(self, student_logits, batch):
        return super().forward(student_logits, batch)


def sparse_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (1, N), generator=g)
    target[0, :2] = IGNORE_INDEX
    probs = torch.rand(1, N, K, generator=g)
    probs = probs / probs.sum(-1, keepdim=True) * 0.8
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]).unsqueeze(0)
    return {
        "target_ids": target,
        "prior_ids": ids,
        "prior_probs": probs,
        "prior_tail": torch.full((1, N), 0.2),
    }


class KeyFormPriorKL(LossTerm):
    """A user's term of an earlier release: it reads the batch in the key form (``batch["prior_ids"]``)."""

    def forward(self, student_logits, batch):
        rows = PositionBatch(
            batch["target_ids"],
            {"prior": SoftLabels(batch["prior_ids"], batch["prior_probs"], batch["prior_tail"])},
        )
        return ForwardKL("prior")(student_logits, rows)


def test_a_term_of_an_earlier_release_still_runs_for_one_release_and_is_told_the_typed_field():
    batch, logits = position_batch(sparse_batch()), torch.randn(1, N, V)
    with pytest.warns(BatchFormWarning) as told:
        value = KeyFormPriorKL()(logits, batch)
    assert {str(w.message) for w in told} == {
        f'batch["{key}"] is deprecated and will be removed in v0.3.0; read {typed}'
        for key, typed in [
            ("target_ids", "batch.target_ids"),
            ("prior_ids", "batch.soft_labels['prior'].ids"),
            ("prior_probs", "batch.soft_labels['prior'].probs"),
            ("prior_tail", "batch.soft_labels['prior'].tail"),
        ]
    }
    torch.testing.assert_close(value, ForwardKL("prior")(logits, batch))
    with pytest.warns(BatchFormWarning, match=r"called with a dict of batch fields.*built from typed fields"):
        from_dict = ForwardKL("prior")(logits, sparse_batch())
    torch.testing.assert_close(from_dict, value)
    with pytest.raises(TypeError, match=r"takes a PositionBatch.*got tuple"):
        ForwardKL("prior")(logits, (batch,))
    with pytest.raises(KeyError, match="no such field"):
        batch["posterior_ids"]
    # a term that tests for a field in the key form is told too, and still gets the right answer
    with pytest.warns(BatchFormWarning, match=r"'prior_ids' in batch.*batch.soft_labels\['prior'\].ids"):
        assert "prior_ids" in batch
    with pytest.warns(BatchFormWarning, match=r"'posterior_ids' in batch.*name in batch.soft_labels"):
        assert "posterior_ids" not in batch


def test_fast_path_flags_are_declared_by_the_code_not_inherited_past_an_override():
    assert HardCrossEntropy().fused_kind() == "hard_ce" and HardCrossEntropy().can_chunk()
    assert ForwardKL("prior").fused_kind() == "forward_kl" and ForwardKL("prior").can_chunk()
    assert ScaledForwardKL("prior").fused_kind() is None and not ScaledForwardKL("prior").can_chunk()
    assert PerPositionOnly("prior").fused_kind() is None and PerPositionOnly("prior").can_chunk()
    assert RedeclaredForwardKL("prior").fused_kind() == "forward_kl"
    assert HardCrossEntropy().can_compile() and not ForwardKL("prior").can_compile()

    class ScaledCE(HardCrossEntropy):  # a user's override: run as written, never compiled behind its back
        def forward(self, student_logits, batch):
            return 2.0 * super().forward(student_logits, batch)

    assert not ScaledCE().can_compile() and not ScaledCE().can_chunk()
    batch = sparse_batch()
    assert not fusable(ScaledForwardKL("prior"), position_batch(batch), V)
    with pytest.raises(ValueError, match="do not declare a fused form"):
        fused_sparse_terms(torch.randn(1, N, V), {"x": ScaledForwardKL("prior")}, position_batch(batch))


def test_a_subclass_overriding_forward_runs_as_written_through_distill_module():
    """hard_ce + a ForwardKL subclass against a sparse store (k < V): the fused pass must not replace it."""
    student = torch.nn.Linear(4, V)  # compute_terms needs only logits and the packed batch
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": ScaledForwardKL("prior", weight=0.5)}
    module = DistillModule(student, terms, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    batch = sparse_batch()
    logits = torch.randn(1, N, V, requires_grad=True)
    values = module.compute_terms(logits, position_batch(batch))
    expected = ScaledForwardKL("prior")(logits, position_batch(batch))
    torch.testing.assert_close(values["prior_kl"][1], expected)
    torch.testing.assert_close(values["hard_ce"][1], HardCrossEntropy()(logits, position_batch(batch)))
    # the same pair with the plain ForwardKL is fused, and still equal to the separate terms
    plain = {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior", weight=0.5)}
    fused_module = DistillModule(student, plain, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert set(fused_module.fused_values(logits, position_batch(batch))) == {"hard_ce", "prior_kl"}
    torch.testing.assert_close(
        fused_module.compute_terms(logits, position_batch(batch))["prior_kl"][1],
        ForwardKL("prior")(logits, position_batch(batch)),
    )


def test_the_chunked_path_runs_an_undeclared_term_whole_and_equal():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(N, 8, requires_grad=True)
    batch = sparse_batch(1)
    terms = {"ce": HardCrossEntropy(), "scaled": ScaledForwardKL("prior"), "sym": PerPositionOnly("prior")}
    plain = {name: term(head(hidden).unsqueeze(0), position_batch(batch)) for name, term in terms.items()}
    chunked = chunked_terms(hidden, head, terms, position_batch(batch), chunk_size=5, fuse=True)
    for name in terms:
        torch.testing.assert_close(chunked[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)
    (g_plain,) = torch.autograd.grad(sum(plain.values()), hidden)
    (g_chunked,) = torch.autograd.grad(sum(chunked.values()), hidden)
    torch.testing.assert_close(g_chunked, g_plain, atol=1e-5, rtol=1e-4)


def test_densifying_keeps_a_real_entry_for_token_zero_beside_padding():
    # row 0: a real entry for id 0 (0.5) and two padded slots (id 0, prob 0) after it
    rows = SparseRows(
        ids=np.array([[3, 0, 0, 0], [0, 0, 0, 0], [2, 1, 0, 0]], dtype=np.int32),
        probs=np.array([[0.3, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.6, 0.2, 0.0, 0.0]], dtype=np.float32),
        tail=np.array([0.2, 1.0, 0.2], dtype=np.float32),
    )
    dense = rows.to_dense(10)
    assert dense[0, 0].item() == pytest.approx(0.5)  # not overwritten by the padding
    assert dense[0, 3].item() == pytest.approx(0.3)
    assert dense[0, 1].item() == pytest.approx(0.2 / 8)  # tail over the 8 ids the row does not store
    assert dense[1].tolist() == pytest.approx([0.1] * 10)  # an all-padding row is all tail
    assert dense[2, 0].item() == pytest.approx(0.2 / 8)  # padding gives token 0 its tail share, not 0
    torch.testing.assert_close(dense.sum(-1), torch.ones(3))


def test_blank_environment_settings_mean_unset(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.setenv("KDL_ASSETS", "  ")
    monkeypatch.setenv("UNRELATED_SETTING", "")
    assert env_setting("WANDB_MODE") is None and env_setting("KDL_ASSETS", "d") == "d"
    dropped = drop_blank_environment()
    assert {"WANDB_MODE", "KDL_ASSETS"} <= set(dropped) and "WANDB_MODE" not in os.environ
    assert os.environ["UNRELATED_SETTING"] == ""  # only the prefixes this project reads


def test_blank_wandb_mode_runs_a_stage(kdl_env, monkeypatch):
    """A blank ``WANDB_MODE=`` means offline unless a key is set; no stage crashes inside wandb."""
    from tests.helpers.cli import kdl

    monkeypatch.setenv("WANDB_MODE", "")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    done = kdl("prior", "experiment=tiny", "logger=[csv,wandb]", env_dir=kdl_env)
    assert "prior" in done.stderr + done.stdout


# ------------------------------------------------------------------------------------------- hub ids


def hub_cache(root: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix in (".json", ".safetensors", ".txt", ".model", ".jinja"):
            (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_ids_resolve_offline_from_the_cache(tiny_dir, tmp_path, monkeypatch):
    snapshot = hub_cache(tmp_path / "hf", "kdl-test/tiny-char", tiny_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("kdl-test/tiny-char") == snapshot
    assert resolve_model_path(f"kdl-test/tiny-char@{'a' * 40}") == snapshot
    model = load_causal_lm("kdl-test/tiny-char")
    assert model.config.vocab_size == len(load_tokenizer("kdl-test/tiny-char"))
    with pytest.raises(AssetError, match=r"not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        resolve_model_path("kdl-test/not-cached")
    with pytest.raises(AssetError, match="neither an existing folder nor a hub id"):
        resolve_model_path("./no/such/folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AssetError, match=r"no config\.json"):
        resolve_model_path(empty)


def test_kdl_runs_with_models_named_by_hub_id_offline(kdl_env, tiny_dir, tmp_path, monkeypatch):
    """The tokenizer and the proxy (aligned, then sampled for the posterior) by hub id, from the cache."""
    from tests.helpers.cli import kdl

    hub_cache(tmp_path / "hf", "kdl-test/tiny-char", tiny_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kdl(
        "distill",
        "experiment=tiny",
        "loss=[hard_ce,posterior_kl]",
        "proxy.path=kdl-test/tiny-char",
        "tokenizer.path=kdl-test/tiny-char",
        "trainer.max_steps=2",
        env_dir=kdl_env,
    )
    (result,) = (kdl_env / "artifacts" / "distill").glob("*/result.json")
    assert json.loads(result.read_text())["nll"] > 0
    (meta,) = (kdl_env / "artifacts" / "align").glob("*/model/config.json")
    assert meta.is_file()


# ------------------------------------------------------------------------------------- code fingerprints


def test_code_fingerprint_follows_user_files_and_the_package(tmp_path, monkeypatch):
    package = tmp_path / "user_pkg_fp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    helper = package / "helper.py"
    helper.write_text("SCALE = 1.0\n")
    (package / "loss.py").write_text(
        textwrap.dedent(
            """
            from kd_lightning.losses.terms import ForwardKL
            from user_pkg_fp.helper import SCALE

            class MyKL(ForwardKL):
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        before = code_fingerprint(["user_pkg_fp.loss.MyKL"])
        names = {name for name, _ in code_closure(["user_pkg_fp.loss.MyKL"])}
        assert {"user_pkg_fp.loss", "user_pkg_fp.helper", "kd_lightning.losses.terms"} <= names
        assert not any(n.split(".")[0] in ("torch", "numpy", "transformers") for n in names)
        assert code_fingerprint(["user_pkg_fp.loss.MyKL"]) == before  # unchanged code, same key
        helper.write_text("SCALE = 2.0\n")  # an edit to a file the loss imports
        assert code_fingerprint(["user_pkg_fp.loss.MyKL"]) != before
    finally:
        for name in [n for n in sys.modules if n.startswith("user_pkg_fp")]:
            del sys.modules[name]


def test_targets_in_walks_nested_configs():
    node = {"a": {"_target_": "x.Y", "b": [{"_target_": "z.W"}, 3]}, "c": "no"}
    assert targets_in(node) == ["x.Y", "z.W"]


# ------------------------------------------------------------------------- token 0 through the stores


def test_token_zero_keeps_its_mass_through_prior_posterior_and_fidelity(kdl_env, tmp_path):
    """A vocabulary whose id 0 is a text token (``a``): padded slots must never erase its entries.

    With R = 0 sampling rounds the posterior is the prior exactly, so any mass lost in densifying the prior
    shows as a difference; the fidelity estimate (dense rows of a store) must keep it too.
    """
    from kd_lightning.cli.build import build_context
    from kd_lightning.evaluation.fidelity import store_estimate
    from kd_lightning.models.tiny_assets import build_tiny_assets, char_tokenizer
    from kd_lightning.stages.estimate import posterior, prior
    from tests.helpers.configs import compose_cfg

    tokenizer = char_tokenizer(specials_first=False)
    assert tokenizer.convert_ids_to_tokens(0) == "a"
    folder = build_tiny_assets(tmp_path / "id0", tokenizer=tokenizer)
    cfg = compose_cfg(
        [
            "experiment=tiny",
            f"tokenizer.path={folder}",
            f"proxy.path={folder}",
            f"data.path={folder}/corpus.jsonl",
            "estimator.posterior.sampling_rounds=0",
        ]
    )
    ctx = build_context(cfg)
    train = ctx.corpus().train
    observed = torch.from_numpy(train.tokens[np.nonzero(train.target_mask())[0] + 1].astype(np.int64))
    zero = observed == 0
    assert zero.sum() > 20  # `a` is common in the corpus
    prior_store, posterior_store = prior(ctx), posterior(ctx)
    vocab = ctx.corpus().vocab_size
    prior_rows = prior_store.all_rows()
    padded = (prior_rows.probs == 0).any(1)
    assert padded[
        zero.numpy()
    ].any()  # a real id 0 beside padding (id 0, probability 0): its mass must survive
    dense_prior = prior_rows.to_dense(vocab)
    stored_zero = torch.from_numpy(
        np.where((prior_rows.ids == 0) & (prior_rows.probs > 0), prior_rows.probs, 0).sum(1)
    ).float()
    torch.testing.assert_close(dense_prior[:, 0][stored_zero > 0], stored_zero[stored_zero > 0])
    gamma = cfg.estimator.prior.gamma
    assert (dense_prior[zero, 0] >= (1 - 1 / gamma) - 1e-4).all()
    dense_posterior = posterior_store.all_rows().to_dense(vocab)
    torch.testing.assert_close(dense_posterior[zero, 0], dense_prior[zero, 0], atol=1e-3, rtol=0)
    fidelity_rows = store_estimate(posterior_store, vocab)(torch.tensor([]))(slice(0, len(observed)))
    assert (fidelity_rows[zero, 0] >= (1 - 1 / gamma) - 1e-3).all()


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("kd_lightning.generation.served", "kd_lightning.teachers.served", "ServedTeacher"),
        ("kd_lightning.generation.server", "kd_lightning.teachers.server", "OpenAICompatibleServer"),
        ("kd_lightning.generation.openai_client", "kd_lightning.teachers.openai_client", "RequestFailure"),
        ("kd_lightning.generation.rollout", "kd_lightning.rollout", "sample_rollouts"),
        ("kd_lightning.generation.chat", "kd_lightning.models.chat", "ChatGenerator"),
    ],
)
def test_a_moved_module_still_imports_from_its_old_path_until_v0_3_0(old, new, name):
    """Users' YAML (``_target_: kd_lightning.generation.served.ServedTeacher``) and imports outlive the move
    of what reaches a teacher into ``kd_lightning.teachers``: the old path warns once, naming both paths and
    the version that removes it, and gives the same object."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(
        FutureWarning, match=rf"{old} moved to {new}; the old path will be removed in v0\.3\.0"
    ):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_chat_backends_old_concurrency_name_still_sets_max_concurrency_until_v0_3_0(monkeypatch):
    from kd_lightning.generation.backends import OpenAITeacher

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.warns(
        FutureWarning, match=r"teacher_backend\.concurrency is now .*max_concurrency.*v0\.3\.0"
    ):
        old = OpenAITeacher("m", base_url="http://127.0.0.1:9/v1", concurrency=3)
    assert (
        old.concurrency == 3
        and OpenAITeacher("m", "http://127.0.0.1:9/v1", max_concurrency=5).concurrency == 5
    )


def test_named_teacher_is_teacher_source_until_v0_3_0():
    from kd_lightning.stages import context
    from kd_lightning.teachers.source import TeacherSource

    with pytest.warns(FutureWarning, match=r"NamedTeacher is now .*TeacherSource; .*removed in v0\.3\.0"):
        assert context.NamedTeacher is TeacherSource


def test_ids_by_text_is_token_text_ids_without_specials_until_v0_3_0(tiny_dir):
    """The API log-probs' token map and the served teacher's are one function (models.vocabulary); the old
    name warns and answers as before (specials skipped)."""
    from kd_lightning.generation.logprobs import ids_by_text
    from kd_lightning.models.loading import load_tokenizer
    from kd_lightning.models.vocabulary import token_text_ids

    tokenizer = load_tokenizer(tiny_dir)
    with pytest.warns(FutureWarning, match=r"ids_by_text is now .*token_text_ids.*removed in v0\.3\.0"):
        old = ids_by_text(tokenizer)
    assert old == token_text_ids(tokenizer, skip_special=True)
    every, special_ids = token_text_ids(tokenizer), set(tokenizer.all_special_ids)
    assert special_ids and special_ids <= set(every.values())  # the served teacher's map keeps them
    assert not special_ids & set(old.values())  # the API log-probs' map never answers one
