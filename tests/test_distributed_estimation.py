"""Data-parallel estimation under torchrun: 2 CPU processes (gloo) build one posterior store, byte for byte
the store one process builds, and a killed group resumes with only the missing shards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli import artifacts, kdl


def torchrun(*args: str, env_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("KDL_FAULT", None)
    if fault:
        env["KDL_FAULT"] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "kd_lightning.cli.main", *args]
    return subprocess.run(command, cwd=env_dir, env=env, capture_output=True, text=True, timeout=600)


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_processes_build_the_same_store_as_one_and_resume_after_a_kill(kdl_env):
    settings = ["experiment=tiny", "estimator.posterior.shard_size=2"]
    kdl("align", *settings, env_dir=kdl_env)  # alignment trains in one process; estimation scales out

    killed = torchrun("posterior", *settings, env_dir=kdl_env, fault="shard:written@1")
    assert killed.returncode != 0
    (partial,) = (kdl_env / "artifacts" / "posterior").glob("*.partial")
    shards = sorted(p.name for p in partial.glob("shard-*"))
    assert 1 <= len(shards) <= 2  # each rank died after its first shard (the other may be stopped first)

    done = torchrun("posterior", *settings, env_dir=kdl_env)
    assert done.returncode == 0, done.stderr[-4000:]
    logs = done.stdout + done.stderr
    resumed = re.search(r"resuming, (\d+)/(\d+) shards already written", logs)
    assert resumed and int(resumed.group(1)) == len(shards) and int(resumed.group(2)) > 4
    built = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2 builds (\d+) shards", logs)}
    assert sum(built.values()) == int(resumed.group(2)) - len(shards) and min(built.values()) > 0
    (store,) = artifacts(kdl_env, "posterior")
    two = store_bytes(store)
    assert {"ids.npy", "probs.npy", "tail.npy", "offsets.npy", "meta.json"} <= set(two)

    shutil.rmtree(kdl_env / "outputs", ignore_errors=True)
    kdl("posterior", *settings, "rebuild=[posterior]", env_dir=kdl_env)  # the same key, one process
    assert store_bytes(store) == two


def test_alignment_under_torchrun_is_refused_with_the_fix(kdl_env):
    done = torchrun("posterior", "experiment=tiny", env_dir=kdl_env)
    assert done.returncode != 0
    assert "run `kdl align` (same settings) in one process first" in done.stdout + done.stderr


def test_teacher_logits_with_sampled_targets_match_one_process(kdl_env):
    tiny = os.environ["KDL_TINY"]
    settings = [
        "experiment=tiny",
        "teacher=local",
        f"teacher.path={tiny}",
        "estimator/teacher_targets=sampled",
    ]
    done = torchrun("teacher-logits", *settings, env_dir=kdl_env)
    assert done.returncode == 0, done.stderr[-4000:]
    (store,) = artifacts(kdl_env, "teacher_logits")
    two = store_bytes(store)
    kdl("teacher-logits", *settings, "rebuild=[teacher_logits]", env_dir=kdl_env)
    assert store_bytes(store) == two
