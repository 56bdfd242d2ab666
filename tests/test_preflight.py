"""``kdl preflight``: the mixture arithmetic against its definition, a verdict per term, and the stage on the
tiny models (validation split only; ``kdl pipeline`` prints it first)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kd_lightning.evaluation.preflight import best_share, check_estimate, mixture_nll, nll, verdict
from tests.helpers.cli import kdl


def test_the_mixture_nll_is_the_nll_of_the_mixed_probabilities():
    rng = np.random.default_rng(0)
    student, estimate = rng.uniform(0.05, 0.9, 500), rng.uniform(0.0, 0.2, 500)
    assert mixture_nll(student, estimate, 0.0) == pytest.approx(nll(student))
    assert mixture_nll(student, estimate, 0.25) == pytest.approx(
        -np.log(0.75 * student + 0.25 * estimate).mean()
    )
    share, value = best_share(student, estimate)
    assert share == 0.0 and value == pytest.approx(nll(student))  # a worse estimate: no share helps
    # an estimate that is sure where the student is not: a small share lowers the NLL
    unsure = np.where(np.arange(500) % 5 == 0, 1e-4, 0.6)
    knows = np.where(np.arange(500) % 5 == 0, 0.5, 0.05)
    share, value = best_share(unsure, knows)
    assert 0 < share < 0.5 and value < nll(unsure)


def test_a_verdict_names_the_numbers_and_what_to_try():
    rng = np.random.default_rng(1)
    student, estimate = rng.uniform(0.1, 0.9, 300), rng.uniform(0.0, 0.01, 300)
    check = check_estimate("5-gram", student, estimate, np.zeros(300, dtype=bool))
    line = verdict(
        "prior_kl", check, nll(student), 0.25, mixture_nll(student, estimate, 0.25), True, "w 1, gamma=2"
    )
    assert "prior_kl: 5-gram" in line and "mixes 25.0% of it" in line and "expect a worse NLL" in line
    assert "try a lower weight or a larger gamma" in line and "still teaches the 5-gram's ranking" in line
    line = verdict("prior_kl", check, nll(student), 0.25, nll(student), False, "w 1")
    assert "leaves the observed token to the CE" in line


def test_kdl_preflight_measures_on_validation_and_the_pipeline_prints_it_first(kdl_env):
    done = kdl("preflight", "experiment=tiny", "data.validation_size=8", env_dir=kdl_env)
    assert "Preflight on the validation split" in done.stdout
    result = json.loads(next((kdl_env / "outputs").rglob("preflight.json")).read_text())
    assert {"student", "ngram", "proxy", "prior_kl", "posterior_kl"} <= set(result["rows"])
    assert result["rows"]["prior_kl"]["lambda"] == pytest.approx(
        1.0 / (2.0 * 3.0)
    )  # w/(γ(h + Σw)): both terms
    assert len(result["verdicts"]) == 2 and result["validation_records"] >= 8
    refused = kdl("preflight", "experiment=tiny", env_dir=kdl_env, check=False)
    assert refused.returncode != 0 and "data.validation_size" in refused.stderr
    pipeline = kdl(
        "pipeline", "experiment=tiny", "data.validation_size=8", "trainer.max_steps=2", "variants={sft: [hard_ce]}",
        env_dir=kdl_env,
    )  # fmt: skip
    assert pipeline.stdout.index("Preflight on the validation split") < pipeline.stdout.index("Held-out")
