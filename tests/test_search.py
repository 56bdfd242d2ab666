"""The validation split and ``kdl pipeline`` with ``search:``: candidates scored on validation only, each group's
best compared over seeds on the held-out sets, resumable; per-variant overrides (weights, a term's settings,
the prior's smoothing, the learning rate) reach the student's key and its stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_lightning.artifacts import Workspace
from kd_lightning.data.corpus import CorpusSpec, build_corpus
from kd_lightning.evaluation.mixture import implied_mixture, nominal_lambda
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.stages.compare import Variant, run_pipeline
from kd_lightning.stages.search import SearchSpec, with_starting_points
from tests.helpers.cli import artifacts, build_counts, kdl

SEARCH = """# @package _global_
defaults:
  - tiny
  - _self_
data:
  validation_size: 8
trainer:
  max_steps: 3
evaluate_students: true
evaluation:
  generation_limit: 2
  max_new_tokens: 4
  question_sets: []
seeds: [0, 1]
compare_to: sft
search:
  select_by: val_nll
  seed: 0
  final_seeds: [0, 1]
  groups:
    sft: [sft]
    coupled: [coupled]
    decoupled: [decoupled]
variants:
  sft: {family: sft, loss: [hard_ce]}
  sft_fast: {family: sft, loss: [hard_ce], optimizer: {lr: 1.0e-2}}
  coupled_low: {family: coupled, loss: [hard_ce, prior_kl], overrides: {prior_kl_weight: 0.05}}
  coupled_high: {family: coupled, loss: [hard_ce, prior_kl], overrides: {prior_kl_weight: 1.0}}
  unigram: {family: smoothing, loss: [hard_ce, prior_kl], overrides: {estimator.prior.smoothing: unigram}}
  sft_on: {family: sft_on, loss: [hard_ce], init_from: sft_fast}
  decoupled:
    family: decoupled
    loss: [hard_ce, prior_kl]
    overrides: {loss.prior_kl.decoupled: true, loss.prior_kl.target_weight: 0.0, kd_weight_schedule.kind: ramp_up}
"""


def test_the_validation_split_is_outside_training_and_held_out(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KDL_TINY", str(tiny_dir))
    spec = CorpusSpec(source="jsonl", path=str(tiny_dir / "corpus.jsonl"), heldout_size=8, validation_size=10)
    corpus = build_corpus(Workspace(tmp_path / "artifacts"), spec, str(tiny_dir))
    plain = build_corpus(
        Workspace(tmp_path / "artifacts"),
        CorpusSpec(**{**spec.__dict__, "validation_size": 0}),
        str(tiny_dir),
    )
    keys = {name: set(getattr(corpus, name).record_keys) for name in ("full_train", "heldout", "validation")}
    assert len(keys["validation"]) >= 9 and not keys["validation"] & keys["full_train"]
    assert not keys["validation"] & keys["heldout"] and set(corpus.counts.record_keys) == keys["full_train"]
    assert keys["heldout"] == set(plain.heldout.record_keys)  # the held-out set does not move
    assert keys["full_train"] | keys["validation"] == set(plain.full_train.record_keys)
    with pytest.raises(ValueError, match="validation_size"):
        CorpusSpec(validation_size=-1)


def test_a_search_selects_on_validation_and_compares_each_groups_best_over_seeds(kdl_env, monkeypatch):
    from kd_lightning.modules import training
    from kd_lightning.stages import train

    scored: list[str] = []
    score = training.heldout_nll
    monkeypatch.setattr(
        training, "heldout_nll", lambda *a, desc="", **k: scored.append(desc) or score(*a, **k)
    )
    started: list[str] = []
    load = train.load_causal_lm
    monkeypatch.setattr(
        train, "load_causal_lm", lambda path, *a, **k: started.append(str(path)) or load(path)
    )
    (kdl_env / "conf" / "experiment").mkdir(parents=True)
    (kdl_env / "conf" / "experiment" / "tiny_search.yaml").write_text(SEARCH)
    args = ("pipeline", "experiment=tiny_search", f"hydra.searchpath=[file://{kdl_env / 'conf'}]")
    done = kdl(*args, env_dir=kdl_env)
    out = sorted((kdl_env / "outputs").rglob("search.csv"))[-1].parent
    result = json.loads((out / "pipeline_result.json").read_text())
    rows = {row["variant"]: row for row in result["search"]["rows"]}
    assert set(rows) == {"sft", "sft_fast", "coupled_low", "coupled_high", "unigram", "decoupled", "sft_on"}
    # a candidate that starts from another trains on from that one's student
    folders = {
        json.loads(r.read_text())["name"]: json.loads(r.read_text())["folder"]
        for r in (kdl_env / "artifacts" / "distill").glob("*/result.json")
    }
    assert started == [str(Path(folders["student sft_fast"]) / "student")], (started, list(folders))
    best = result["search"]["best"]
    assert set(best) == {"sft", "coupled", "decoupled"}
    assert best["coupled"] == min(["coupled_low", "coupled_high"], key=lambda v: rows[v]["val_nll"])
    assert rows["coupled_high"]["lambda"] == pytest.approx(1.0 / (2.0 * 2.0))  # w/(γ(1+w)), γ=2, w=1
    assert rows["unigram"]["smoothing"] == "unigram" and not rows["unigram"]["selected"]  # in no group
    assert not rows["sft_on"]["selected"]
    assert rows["decoupled"]["decoupled"] and not rows["decoupled"]["caps_observed"]
    finals = {(row["variant"], row.get("seed")) for row in result["rows"] if "variant" in row}
    assert finals == {(v, s) for v in best.values() for s in (0, 1)}
    assert "Search on the validation split" in done.stdout and (out / "validation_curve.png").is_file()
    # trials are scored on validation only; a selected trial gets its held-out NLL when the finals ask
    results = [json.loads(p.read_text()) for p in (kdl_env / "artifacts" / "distill").glob("*/result.json")]
    trials = {r["name"]: r for r in results if "seed" not in r["name"]}
    assert all("val_nll" in r for r in results)
    unselected = [r for name, r in trials.items() if not any(v in name for v in best.values())]
    assert unselected and all("nll" not in r for r in unselected)
    # each student scores the validation split once: a trial promoted to a final adds its held-out split only
    validated = [d for d in scored if d.startswith("validate")]
    assert len(validated) == len(results), f"{len(results)} students, validation scored {validated}"
    assert len(artifacts(kdl_env, "prior")) == 2  # the n-gram prior and the unigram smoothing
    counts = build_counts(kdl_env)
    kdl(*args, env_dir=kdl_env)  # a rerun trains nothing again
    assert build_counts(kdl_env) == counts


def test_a_final_that_starts_from_another_brings_its_starting_point_along():
    candidates = [
        Variant("sft", None, None),
        Variant("warm", None, "sft", report=False),
        Variant("gad", None, "warm"),
        Variant("coupled", None, None),
    ]
    assert with_starting_points(["coupled", "gad"], candidates) == ["coupled", "sft", "warm", "gad"]
    assert with_starting_points(["sft", "gad"], candidates) == ["sft", "warm", "gad"]


def test_report_must_be_a_boolean_and_compare_to_a_reported_variant(kdl_env):
    done = kdl(
        "pipeline", "experiment=tiny", "+variants.x.loss=[hard_ce]", "+variants.x.report=no",
        env_dir=kdl_env, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "variants.x.report must be true or false, got 'no'" in done.stderr
    assert "Traceback" not in done.stderr and not artifacts(kdl_env, "distill")  # refused before training
    warm_only = [Variant("sft", None, None), Variant("warm", None, "sft", report=False)]
    with pytest.raises(ValueError, match="compare_to='warm' names a variant with report: false"):
        run_pipeline(None, warm_only, compare_to="warm")


def test_variant_overrides_name_real_settings(kdl_env):
    done = kdl(
        "pipeline", "experiment=tiny", "+variants.x.loss=[hard_ce]", "+variants.x.overrides={prior_kl_wieght: 1}",
        env_dir=kdl_env, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "variant override 'prior_kl_wieght' names no setting" in done.stderr


def test_a_search_refuses_the_held_out_split_and_a_corpus_without_validation():
    with pytest.raises(ValueError, match="validation split only"):
        SearchSpec(select_by="nll")


def test_the_implied_mixture_is_the_optimum_of_the_weighted_loss():
    """λ = w/(γ(1+w)) for one prior term; the posterior's share counts κ/(κ+R) of the prior and R/(κ+R) of
    the proxy; a decoupled term without its target part does not cap the observed token."""
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior", weight=1.0)}
    (share,) = implied_mixture(terms, hard_ce_weight=1.0, gamma=2.0)
    assert share.share == pytest.approx(0.25) and share.caps_observed
    both = {**terms, "posterior_kl": ForwardKL("posterior", weight=1.0)}
    shares = implied_mixture(both, 1.0, gamma=2.0, concentration=8.0, rounds=16)
    assert nominal_lambda(shares) == pytest.approx((0.5 + 8 / 24 / 2 + 16 / 24) / 3)
    assert shares[1].proxy == pytest.approx(16 / 24 / 3)
    decoupled = {
        "prior_kl": ForwardKL("prior", weight=2.0, decoupled=True, target_weight=0.0, nontarget_weight=0.5)
    }
    (share,) = implied_mixture(decoupled, 1.0, gamma=2.0)
    assert share.weight == 1.0 and not share.caps_observed and share.share == pytest.approx(0.5 / 2)
