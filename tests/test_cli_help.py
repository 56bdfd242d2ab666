"""A newcomer's first commands: `kdl --help`, `kdl <stage> --help`, `kdl --version`, shell completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.cli.help import STAGE_PAGES, STAGES, main_help, stage_help
from kd_lightning.environment import package_version
from tests.helpers.cli import Completed
from tests.helpers.cli import kdl as run_kdl

ROOT = Path(__file__).resolve().parents[1]
KDL = [sys.executable, "-m", "kd_lightning.cli.kdl"]


def kdl(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script's module as a real process: what it answers before any heavy import is the
    subject here."""
    return subprocess.run(
        [*KDL, *args], cwd=cwd, env=env or os.environ, capture_output=True, text=True, timeout=300
    )


def kdl_stage(*args: str, cwd: Path, env: dict | None = None) -> Completed:
    """A stage's answer (its help, shell completion), computed in this interpreter."""
    return run_kdl(*args, env_dir=cwd, env=env, check=False)


@pytest.mark.parametrize("form", [["--help"], ["-h"], ["help"], []], ids=["--help", "-h", "help", "bare"])
def test_main_help_goes_to_stdout_with_status_zero(form):
    done = kdl(*form)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == main_help().strip()
    for stage in (*STAGES, "report"):  # every stage on its own line, with what it builds and reads
        (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith(f"  {stage} ")]
        assert "←" in line and len(line.split("←")[0].split()) > 3
    assert "kdl pipeline experiment=tiny" in done.stdout and "README.md" in done.stdout


def test_version_names_ours_and_the_frameworks():
    done = kdl("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"kd_lightning {package_version()} (")
    for name in ("torch", "transformers", "lightning", "hydra-core", "python"):
        assert name in done.stdout


def test_an_unknown_stage_is_a_one_line_error_with_a_suggestion():
    done = kdl("distil")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        "kdl: unknown stage 'distil'; did you mean `kdl distill`? (kdl --help lists the stages)"
    )


def test_stage_help_shows_current_values_groups_and_where_results_go(kdl_env):
    done = kdl_stage("distill", "prior_kl_weight=0.25", "loss=[hard_ce,prior_kl]", "--help", cwd=kdl_env)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    assert text.startswith(f"kdl distill — {STAGE_PAGES['distill'].summary}.")
    assert "prior_kl_weight=0.25" in text and "loss=[hard_ce,prior_kl]" in text  # the command line's values
    assert "student=smollm2_layers" in text and "artifacts/distill/<key>/" in text
    assert re.search(r"^loss: .*hard_ce.*prior_kl", text, flags=re.M)  # groups with their options
    assert "kdl distill --cfg job" in text and "--hydra-help" in text
    assert "main is powered by Hydra" not in text
    hydra_help = kdl_stage("distill", "--hydra-help", cwd=kdl_env)
    assert hydra_help.returncode == 0 and "Hydra" in hydra_help.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_its_own_page(stage, kdl_env):
    from tests.helpers.configs import compose_cfg

    cfg = compose_cfg([] if stage == "generate" else ["experiment=tiny"], stage)
    page = stage_help(cfg)
    assert page.startswith(f"kdl {stage} — ") and "$APP_CONFIG_GROUPS" in page
    for key, _ in STAGE_PAGES[stage].settings:
        assert re.search(rf"^  {re.escape(key)}=\S", page, flags=re.M), key
    assert "???" not in page.split("config groups")[0] or stage in ("generate",)


def test_generate_help_runs_from_the_cli(kdl_env):
    done = kdl_stage("generate", "--help", cwd=kdl_env)
    assert done.returncode == 0 and "teacher_backend=local" in done.stdout


def test_shell_completion_completes_stages_then_hands_over_to_hydra(kdl_env):
    script = kdl_stage("-sc", "install=bash", cwd=kdl_env)
    assert (
        script.returncode == 0
        and "complete -o nospace -o default -F hydra_bash_completion kdl" in script.stdout
    )
    stages = kdl_stage("-sc", "query=bash", cwd=kdl_env, env={"COMP_LINE": "kdl p"})
    assert stages.stdout.split() == ["prior", "posterior", "pipeline", "prior-quality", "preflight", "plan"]
    keys = kdl_stage("-sc", "query=bash", cwd=kdl_env, env={"COMP_LINE": "kdl distill loss="})
    assert "loss=prior_kl" in keys.stdout.split()


def test_the_readme_quotes_the_real_help():
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"<!-- kdl --help -->\n```text\n(.*?)```", readme, flags=re.S)
    assert quoted, "README.md should quote `kdl --help` after a <!-- kdl --help --> marker"
    assert quoted.group(1).strip() == main_help().strip()


def test_help_leads_to_the_selected_teacher_and_every_kd_target(kdl_env):
    served = kdl_stage("teacher-logits", "teacher=served", "--help", cwd=kdl_env)
    for setting in ("teacher.base_url=???", "teacher.model=???", "teacher.api=vllm", "teacher.max_logprobs=20",
                    "teacher.max_concurrency=8", "teacher.connect_budget_s=15", "teachers={}"):  # fmt: skip
        assert setting in served.stdout, setting
    assert "estimator.teacher_targets.k=20 " in served.stdout  # a served teacher's k fits its cap
    local = kdl_stage("teacher-logits", "teacher=smollm2", "--help", cwd=kdl_env)
    assert "estimator.teacher_targets.k=64 " in local.stdout and "teacher.base_url=" not in local.stdout
    distill = kdl_stage("distill", "--help", cwd=kdl_env)
    for target in ("teacher_mixture", "teacher:<name>", "teacher_logprobs", "offline_teacher"):
        assert target in distill.stdout, target
    kd_target = next(line for line in distill.stdout.splitlines() if line.strip().startswith("kd_target="))
    assert "proxy_agreement" not in kd_target  # a store that weights positions, not a target to compare with
    assert "+teachers.<name>.path=" in distill.stdout and "trainer.compile=False" in distill.stdout
    assert "loss.prior_kl.decoupled=False" in distill.stdout
