"""Sweep configs: wandb grouping and tags, short run names, the Optuna sweeper's objective."""

from __future__ import annotations

import json

import pytest
import yaml

from kd_lightning.cli.main import objective
from kd_lightning.cli.resolvers import short_run_name
from tests.helpers.cli import kdl
from tests.helpers.configs import compose_cfg


@pytest.mark.parametrize(
    "sweep", ["ngram_order", "gamma", "sampling_rounds", "estimator_variants", "loss_weights"]
)
def test_sweeps_group_and_tag_their_runs(sweep, kdl_env):
    cfg = compose_cfg([f"sweep={sweep}", "experiment=tiny", "logger=[csv,wandb]"])
    assert cfg.run_group.startswith("sweep-") and "sweep" in cfg.run_tags
    assert cfg.logger.wandb.group == cfg.run_group
    assert cfg.logger.wandb.tags == ["pipeline", "sweep", sweep]


def test_short_run_names():
    assert short_run_name("experiment=tiny,logger=[csv,wandb],loss=[a,b],w=0.5") == "loss=[a,b],w=0.5"
    assert short_run_name("estimator.prior.ngram_order=3,experiment=demo,estimator/posterior=x") == (
        "ngram_order=3,estimator_posterior=x"
    )
    assert short_run_name("experiment=demo") == "run"
    long = short_run_name("a.b=" + "x" * 300)
    assert len(long) == 80 and "~" in long


def test_objective_paths():
    result = {"nll": 2.5, "rows": [{"nll": 3.0}, {"nll": 1.0}]}
    assert objective(result, "nll") == 2.5 and objective(result, "rows.-1.nll") == 1.0
    with pytest.raises(KeyError, match=r"sweep_objective='rows\.5\.nll' is not in"):
        objective(result, "rows.5.nll")


def test_optuna_sweep_minimises_the_validation_nll_never_the_held_out_one(kdl_env):
    kdl(
        "distill", "experiment=tiny", "sweep=optuna_loss_weights", "hydra.sweeper.n_trials=3",
        "data.validation_size=16", env_dir=kdl_env,
    )  # fmt: skip
    (results,) = list((kdl_env / "multirun").rglob("optimization_results.yaml"))
    best = yaml.safe_load(results.read_text())
    trials = [json.loads(p.read_text()) for p in (kdl_env / "multirun").rglob("distill_result.json")]
    assert len(trials) == 3
    assert best["best_value"] == pytest.approx(min(t["val_nll"] for t in trials))
    assert set(best["best_params"]) == {"prior_kl_weight", "posterior_kl_weight", "distill_temperature"}


def test_an_ad_hoc_multirun_names_each_job_by_its_overrides_and_groups_the_sweep(kdl_env):
    from kd_lightning.report.runs import read_wandb_run

    args = ["distill", "-m", "experiment=tiny", "loss=[hard_ce,prior_kl]", "prior_kl_weight=0.5,1.0"]
    kdl(*args, "logger=[csv,wandb]", env_dir=kdl_env)
    runs = [read_wandb_run(p) for p in sorted((kdl_env / "multirun").rglob("run-*.wandb"))]
    students = sorted(r["name"] for r in runs)
    assert students == [
        "distill-loss=[hard_ce,prior_kl],prior_kl_weight=0.5",
        "distill-loss=[hard_ce,prior_kl],prior_kl_weight=1.0",
    ], students
    (sweep_dir,) = (kdl_env / "multirun" / "distill").iterdir()
    assert {r["group"] for r in runs} == {f"distill-sweep-{sweep_dir.name}"}
    single = compose_cfg(["experiment=tiny"], "distill")  # a plain run keeps the stage's name and group
    assert single.run_name == single.run_group == "distill"
