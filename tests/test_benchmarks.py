"""Every benchmark runs at its smoke size and ends with the JSON line it documents (``JSON_KEYS``), so a
change that breaks ``make bench`` fails here first. The full sizes stay for ``make bench``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.assets import requires_real_assets

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


def documented_keys(script: Path) -> tuple[str, ...]:
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "JSON_KEYS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{script.name} documents no JSON_KEYS")


def test_make_bench_runs_every_script():
    makefile = (ROOT / "Makefile").read_text()
    assert set(SCRIPTS) <= set(makefile.split()), "make bench must run every benchmarks/bench_*.py"


@requires_real_assets
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_size_ends_with_its_json(script, tmp_path):
    done = subprocess.run(  # a benchmark is a script run as a process (its children measure memory)
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert tuple(figures) == documented_keys(ROOT / "benchmarks" / script)
    assert figures["bench"]


def test_every_kdl_command_of_the_gpu_checks_composes(tiny_dir, tmp_path, monkeypatch):
    """benchmarks/gpu_checks.sh runs only where a GPU is lent, so its kdl commands are composed here (the
    trainer=gpu/fsdp settings build without CUDA): a renamed option or group fails here, not on the GPU."""
    import re

    from tests.helpers.configs import compose_cfg

    script = (ROOT / "benchmarks" / "gpu_checks.sh").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    experiment = re.search(r"gpu_small\.yaml\" <<'EOF'\n(.*?)\nEOF\n", script, re.S)[1]
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "gpu_small.yaml").write_text(experiment)
    monkeypatch.setenv("KDL_TINY", str(tiny_dir))
    monkeypatch.chdir(tmp_path)
    steps = re.findall(
        r'^step (\w+) "\$PY" -m kd_lightning\.cli\.kdl (.*)$', script.replace("\\\n", " "), re.M
    )
    assert {name for name, _ in steps} >= {
        "pipeline_gpu_5_seeds",
        "distill_fsdp_1gpu",
        "fsdp_gkd",
        "minillm_gpu",
    }
    for name, line in steps:
        line = line.replace("$KDL_TINY", str(tiny_dir)).replace("$WORK", str(tmp_path))
        stage, *overrides = (word.strip('"') for word in line.split())
        cfg = compose_cfg(overrides, stage=stage)
        assert cfg.trainer.accelerator == "gpu", name
        if "experiment=gpu_small" in overrides:
            assert list(cfg.seeds) == [0, 1, 2, 3, 4] and set(cfg.variants) >= {"sft", "prior_posterior"}


def test_summarise_fidelity_averages_each_group_over_its_seeds(tmp_path, monkeypatch, capsys):
    """benchmarks/summarise_fidelity.py (the README's v1 against Proxy-KD fidelity table): runs grouped by
    their overrides other than the seed, each estimate averaged over the group's seeds."""
    import runpy

    def run(name: str, overrides: list[str], kl: float) -> Path:
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (folder / "fidelity.csv").write_text(
            "estimate,kind,kl,kl_median,tv,topk_recall,positions\n"
            f"posterior R=16,posterior,{kl},{kl / 2},0.5,0.25,100\n"
        )
        return folder

    folders = [
        run("a", ["alignment=lora", "seed=0"], 4.0),
        run("b", ["alignment=lora", "seed=1", "run_group=x"], 6.0),
        run("c", ["alignment=proxy_kd", "seed=0"], 3.0),
    ]
    monkeypatch.setattr(sys, "argv", ["summarise_fidelity.py", *map(str, folders)])
    runpy.run_path(str(ROOT / "benchmarks" / "summarise_fidelity.py"), run_name="__main__")
    out = capsys.readouterr().out.strip().splitlines()
    assert "| alignment=lora | posterior R=16 | 2 | 5.000 ± 1.414 | 2.500 ± 0.707 |" in "\n".join(out)
    assert "| alignment=proxy_kd | posterior R=16 | 1 | 3.000 ± 0.000 |" in "\n".join(out)
    rows = json.loads(out[-1])["rows"]
    assert [r["seeds"] for r in rows] == [["0", "1"], ["0"]]
