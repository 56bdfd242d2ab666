"""``kdl report`` on synthetic sweeps: Hydra job folders and wandb offline runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.report import ANY, collect_runs, markdown_table, write_report
from tests.helpers.cli import kdl

NLL = {  # (variant, n, R) -> nll; SFT depends on neither, +prior only on n
    ("sft_only", None, None): 6.4,
    ("plus_prior", 3, None): 6.3,
    ("plus_prior", 5, None): 6.25,
}
for n in (3, 5):
    for r in (1, 4):
        NLL[("plus_prior_posterior", n, r)] = 6.2 - 0.01 * n - 0.02 * r


def fake_job(root: Path, index: int, n: int, r: int) -> None:
    job = root / str(index)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- estimator.prior.ngram_order={n}\n- estimator.posterior.sampling_rounds={r}\n- experiment=paper_ablation\n"
    )
    rows = [{"name": "proxy (aligned)", "nll": 1.5, "ppl": 4.48, "tokens": 100}]
    for variant, key in (
        ("sft_only", (None, None)),
        ("plus_prior", (n, None)),
        ("plus_prior_posterior", (n, r)),
    ):
        nll = NLL[(variant, *key)]
        rows.append(
            {
                "variant": variant,
                "name": f"student {variant}",
                "nll": nll,
                "ppl": 2.718281828**nll,
                "token_accuracy": 0.1,
                "folder": f"/artifacts/distill/{variant}-{key}",  # one folder per trained student
            }
        )
    (job / "pipeline_result.json").write_text(json.dumps({"rows": rows}))
    log = job / "run-student plus_prior_posterior" / "version_0"
    log.mkdir(parents=True)
    with (log / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train/loss"])
        writer.writerows([[0, s, 10.0 - s - n - r] for s in range(4)])


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "pipeline" / "2026-01-01_00-00-00"
    for i, (n, r) in enumerate((n, r) for n in (3, 5) for r in (1, 4)):
        fake_job(root, i, n, r)
    return root


def test_rows_are_merged_per_student_with_wildcards(sweep):
    runs = collect_runs([sweep])
    by = {(r.label, r.settings["ngram_order"], r.settings["sampling_rounds"]): r for r in runs}
    assert len(runs) == 1 + 1 + 2 + 4  # proxy once, SFT once, +prior per n, +posterior per (n, R)
    assert by[("sft_only", ANY, ANY)].metrics["nll"] == 6.4
    assert by[("plus_prior", 5, ANY)].metrics["nll"] == 6.25
    assert by[("plus_prior_posterior", 5, 4)].metrics["nll"] == pytest.approx(6.2 - 0.05 - 0.08)
    assert by[("proxy (aligned)", ANY, ANY)].metrics == {"nll": 1.5, "ppl": 4.48}
    curve = by[("plus_prior_posterior", 3, 4)].curve
    assert curve == [(s, 10.0 - s - 7) for s in range(4)]


def test_table_and_plots(sweep, tmp_path):
    runs = collect_runs([sweep])
    table = markdown_table(runs)
    assert table.splitlines()[0] == "| run | ngram_order | sampling_rounds | nll | ppl | token_accuracy |"
    assert "| plus_prior_posterior | 3 | 1 | 6.1500 |" in table and "| sft_only | * | * | 6.4000 |" in table
    out = write_report(runs, tmp_path / "report", ["nll"])
    names = set(out["plots"])
    assert names == {"nll_vs_ngram_order.png", "nll_vs_sampling_rounds.png", "loss_curves.png"}
    for name in names:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "![nll_vs_sampling_rounds.png](nll_vs_sampling_rounds.png)" in report
    with (tmp_path / "report" / "runs.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(runs)


def test_cli_and_its_errors(sweep, tmp_path):
    done = kdl("report", str(sweep), "--metric", "nll", env_dir=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert "| sft_only | * | * |" in done.stdout and (sweep / "report" / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    done = kdl("report", str(empty), env_dir=tmp_path, check=False)
    assert done.returncode == 1 and "no runs found" in done.stderr and "Traceback" not in done.stderr


def test_wandb_offline_runs(tmp_path):
    """Runs logged offline by wandb itself; a config larger than a 32 KiB block spans several records."""
    script = r"""
import sys, wandb
for n, r, nll in ((3, 1, 6.1), (3, 4, 6.0), (5, 4, 5.9)):
    run = wandb.init(mode="offline", dir=sys.argv[1], group="sweep", tags=["paper_ablation"],
                     config={"kdl": {"estimator": {"prior": {"ngram_order": n}, "posterior": {"sampling_rounds": r}},
                                     "blob": "x" * 40000, "seed": 0}, "run": "student plus_prior_posterior"})
    for step in range(3):
        run.log({"train/loss": 9.0 - step, "trainer/global_step": step})
    run.log({"heldout/nll": nll})
    run.finish()
"""
    env = {"WANDB_SILENT": "true", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = collect_runs([tmp_path / "wandb"])
    got = sorted((r.settings["ngram_order"], r.settings["sampling_rounds"], r.metrics["nll"]) for r in runs)
    assert got == [(3, 1, 6.1), (3, 4, 6.0), (5, 4, 5.9)]
    assert all(r.label == "student plus_prior_posterior" and len(r.curve) == 3 for r in runs)
    assert "seed" not in runs[0].settings  # only what differs between the runs is a column
