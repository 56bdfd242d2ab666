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
