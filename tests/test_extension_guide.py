"""The extension guide's example works as written: one file + one YAML, picked up by the property tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.cli.main import conf_dir

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"


def code_block(text: str, first_line: str) -> str:
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


@pytest.mark.slow
def test_guide_example_loss_is_picked_up_by_the_property_tests(tmp_path):
    text = GUIDE.read_text()
    module = code_block(text, "# kd_lightning/losses/jeffreys.py")
    yaml = code_block(text, "# conf/loss/jeffreys.yaml")
    # the example, installed as its own package (the guide puts it inside kd_lightning/losses/)
    package = tmp_path / "ext" / "kdl_example"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jeffreys.py").write_text(module)
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf, ignore=shutil.ignore_patterns("local"))
    (conf / "loss" / "jeffreys.yaml").write_text(
        yaml.replace("kd_lightning.losses.jeffreys", "kdl_example.jeffreys")
    )
    env = {
        **os.environ,
        "KDL_CONF": str(conf),
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "ext"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_loss_properties.py",
            "-k",
            "jeffreys",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    passed = int(re.search(r"(\d+) passed", done.stdout).group(1))
    assert passed >= 20, done.stdout[-1000:]  # every property, both target forms, and the fused path
