"""kd_lightning as a user gets it: a wheel installed into a fresh virtualenv, `kdl` run from a folder
outside the repository, and docs/extending.md's example run literally (same files, same commands).

The wheel is built from a copy of the source tree (what a clean clone holds), installed with ``--no-deps``
into a new virtualenv whose only link to this one is a ``.pth`` line to its site-packages, so the installed
dependencies are reused but this checkout (and its editable install) is not importable there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from kd_lightning.artifacts import build_events
from kd_lightning.environment import conf_dir

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "artifacts", "outputs", "multirun", "wandb", "lightning_logs", "build", "dist",
    "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "local", ".whl", ".gl", "notebooks",
)  # fmt: skip


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the guide."""
    return re.findall(r"```(python|yaml|bash)\n(.*?)```", text, flags=re.S)


def guide_files(text: str) -> dict[str, str]:
    """Files the guide shows: python/yaml blocks whose first line is ``# <relative path>``."""
    files = {}
    for language, body in code_blocks(text):
        first = body.splitlines()[0]
        if language in ("python", "yaml") and first.startswith("# my_"):
            files[first[2:].split()[0]] = body
    return files


def guide_commands(text: str) -> list[str]:
    """Every `kdl ...` line of the guide's bash blocks, in order."""
    return [
        line.strip()
        for language, body in code_blocks(text)
        if language == "bash"
        for line in body.splitlines()
        if line.strip().startswith("kdl ")
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """A wheel built from the source tree, installed into a new virtualenv; returns its environment."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("kd_lightning-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # reuse this environment's dependencies (a path line: its own .pth files, the editable install's
    # included, are not processed, so this checkout stays invisible)
    Path(site, "reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": "",
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("KDL_CONF", None)
    return {"env": env, "python": str(python), "wheel": str(wheel)}


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def user_env(installed, tmp_path: Path) -> dict[str, str]:
    return {
        **installed["env"],
        "KDL_TINY": os.environ["KDL_TINY"],
        "KDL_ARTIFACTS": str(tmp_path / "artifacts"),
    }


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_kdl_runs_outside_the_repository(installed, kdl_env, tmp_path):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n.split("kd_lightning/conf/", 1)[1] for n in names if n.startswith("kd_lightning/conf/")}
    expected = {str(p.relative_to(conf_dir())) for p in conf_dir().rglob("*.yaml") if "local" not in p.parts}
    assert expected <= shipped, sorted(expected - shipped)
    assert "kd_lightning/corpora/smollm2_self_instruct.jsonl" in names
    env = user_env(installed, tmp_path)
    where = run(
        [installed["python"], "-c", "import kd_lightning, kd_lightning.environment as e; print(kd_lightning.__file__, e.conf_dir())"],
        kdl_env,
        env,
    ).stdout  # fmt: skip
    assert str(ROOT) not in where and "site-packages/kd_lightning/conf" in where
    # stages compose from the packaged configs (tests/test_configs.py composes every one in-process)
    for stage in ("distill", "fidelity"):
        printed = run(["kdl", stage, "experiment=tiny", "--cfg", "job"], kdl_env, env).stdout
        assert f"stage: {stage}" in printed
    assert "stage: generate" in run(["kdl", "generate", "--cfg", "job"], kdl_env, env).stdout
    done = run(["kdl", "pipeline", "experiment=tiny"], kdl_env, env)
    assert "| student plus_prior_posterior |" in done.stdout


@pytest.mark.slow
def test_the_guide_runs_literally_against_the_installed_wheel(installed, kdl_env, tmp_path):
    text = GUIDE.read_text()
    project = tmp_path / "my_project"
    files = guide_files(text)
    assert set(files) == {
        "my_losses/jeffreys.py",
        "my_conf/loss/jeffreys.yaml",
        "my_modules/confidence.py",
        "my_conf/module/confidence.yaml",
    }
    for relative, body in files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    for package in ("my_losses", "my_modules"):  # the layout says: (empty)
        (project / package / "__init__.py").write_text("")
    env = user_env(installed, tmp_path)
    loss_command, module_command = guide_commands(text)
    distill = tmp_path / "artifacts" / "distill"

    def results() -> dict[str, dict]:
        return {p.parent.name: json.loads(p.read_text()) for p in distill.glob("*/result.json")}

    # a new loss: trained, logged under its name
    run(loss_command.split(), project, env)
    (first,) = results().values()
    assert set(first["terms"]) == {"hard_ce", "jeffreys"}
    metrics = next((project / "outputs").rglob("metrics.csv")).read_text()
    assert "train/jeffreys" in metrics
    # unchanged code: the cached student is reused (its build record shows one build, one training)
    (student,) = [p for p in distill.iterdir() if p.is_dir()]
    assert (len(build_events(student, "build")), len(build_events(student, "train"))) == (1, 1)
    run(loss_command.split(), project, env)
    assert len(results()) == 1
    assert (len(build_events(student, "build")), len(build_events(student, "train"))) == (1, 1)
    # an edited loss file: a new key, the student is trained again
    loss_file = project / "my_losses" / "jeffreys.py"
    loss_file.write_text(
        loss_file.read_text().replace("+ kl_buckets(log_q, log_p)", "+ 0.5 * kl_buckets(log_q, log_p)")
    )
    run(loss_command.split(), project, env)
    assert len(results()) == 2
    # rebuild=[distill]: the same key, trained again
    key = max(results(), key=lambda k: (distill / k / "result.json").stat().st_mtime_ns)  # the edited loss's
    before = (distill / key / "result.json").stat().st_mtime_ns
    run([*loss_command.split(), "rebuild=[distill]"], project, env)
    assert len(results()) == 2 and (distill / key / "result.json").stat().st_mtime_ns > before

    # a new module: selected by name from the user's config folder
    run(module_command.split(), project, env)
    modules = {r["module"] for r in results().values()}
    assert "ConfidencePenaltyModule" in modules
    logged = "".join(p.read_text() for p in (project / "outputs").rglob("metrics.csv"))
    assert "train/confidence_penalty" in logged


@pytest.mark.slow
def test_guide_loss_is_picked_up_by_the_property_tests(tmp_path):
    """The guide's loss file and YAML, added to a copy of the shipped configs, get every property test."""
    files = guide_files(GUIDE.read_text())
    package = tmp_path / "ext" / "my_losses"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jeffreys.py").write_text(files["my_losses/jeffreys.py"])
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf, ignore=shutil.ignore_patterns("local"))
    (conf / "loss" / "jeffreys.yaml").write_text(files["my_conf/loss/jeffreys.yaml"])
    env = {
        **os.environ,
        "KDL_CONF": str(conf),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "ext"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_loss_properties.py", "-k", "jeffreys"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert passed >= 30, done.stdout[-1000:]  # every property, all three target forms, and the fused path
