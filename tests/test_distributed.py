"""Two-process DDP on CPU (gloo) with an online teacher matches one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.data.datamodule import EpochBatchSampler

WORKER = Path(__file__).parent / "scripts" / "ddp_worker.py"


def run_script(script: Path, *arguments) -> None:
    """A worker script in its own process (one thread per rank); its stderr's tail on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), *map(str, arguments)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def run_worker(tiny_dir, out, strategy, devices, batch_size, *extra):
    run_script(WORKER, tiny_dir, out, strategy, devices, batch_size, *extra)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    return run_worker(tiny_dir, tmp_path_factory.mktemp("single") / "single.pt", "auto", 1, 8)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["replicated", "shard"])
def test_two_process_ddp_matches_one_process(tiny_dir, tmp_path, single, teacher):
    # 22 sequences: global batches of 8, 8, then 6 split 3 + 3; ranks hold different token counts
    ddp = run_worker(tiny_dir, tmp_path / "ddp.pt", "ddp", 2, 4, teacher)
    assert ddp["world"] == 2 and len(ddp["losses"]) == len(single["losses"]) == 3
    # a sharded teacher: rank 0 holds about half (dim-0 chunks round up on small tensors)
    if teacher == "shard":
        assert 0.45 < ddp["teacher_local_fraction"] < 0.6
    else:
        assert ddp["teacher_local_fraction"] == 1.0
    torch.testing.assert_close(
        torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=1e-5
    )
    for name, weight in single["student"].items():
        torch.testing.assert_close(ddp["student"][name], weight, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_processes_accumulating_two_micro_batches_match_one_process(tiny_dir, tmp_path, single):
    """2 ranks × 2 sequences × 2 accumulated micro-batches per step: the global batches of one process with 8,
    every target token weighted alike across micro-batches and ranks (unequal lengths everywhere)."""
    ddp = run_worker(tiny_dir, tmp_path / "ddp.pt", "ddp", 2, 2, "replicated", "2")
    assert ddp["world"] == 2 and len(ddp["losses"]) == 2 * len(single["losses"])
    for name, weight in single["student"].items():
        torch.testing.assert_close(ddp["student"][name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_ranks_split_every_global_batch_between_them():
    single = list(EpochBatchSampler(22, 8, seed=0))
    ranks = [list(EpochBatchSampler(22, 4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    assert [len(b) for b in ranks[1]] == [4, 4, 3]
    # a last global batch with fewer sequences than ranks is dropped on every rank alike
    tiny = [list(EpochBatchSampler(9, 4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(tiny[0]) == len(tiny[1]) == 1


def test_kdl_distill_trains_under_lightning_ddp_from_the_command_line(kdl_env):
    """Lightning's launcher re-runs `kdl distill` for rank 1; that rank joins the training instead of
    waiting on the student artifact's lock, and only rank 0 saves and evaluates the student."""
    from kd_lightning.artifacts import build_events
    from tests.helpers.cli import artifacts, kdl_process

    args = ["experiment=tiny", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    args += ["data.keep_duplicate_heldout=true", "loss=[hard_ce,prior_kl,posterior_kl]"]
    done = kdl_process("distill", *args, env_dir=kdl_env)  # the launcher re-runs the process's command
    assert "training process 1 of" in done.stderr + done.stdout  # rank 1 trained along, then left
    (student,) = artifacts(kdl_env, "distill")
    result = json.loads((student / "result.json").read_text())
    assert result["nll"] > 0 and (student / "student" / "config.json").is_file()
    assert [len(build_events(student, e)) for e in ("build", "train")] == [1, 1]
    again = kdl_process("distill", *args, env_dir=kdl_env)  # served from the cache: no processes started
    assert "Initializing distributed" not in again.stderr + again.stdout
    assert [len(build_events(student, e)) for e in ("build", "train")] == [1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gad", "minillm"])
def test_kdl_distill_runs_the_on_policy_recipes_under_two_process_ddp(kdl_env, recipe):
    """GAD (two models taking turns: kdl's trainer=ddp finds the unused parameters for it) and MiniLLM
    (several PPO backward passes per step) train under Lightning's DDP launcher from the command line; rank 0
    saves and evaluates the student. (Their steps against one process: the GAD worker test above, GKD's.)"""
    from tests.helpers.cli import artifacts, kdl_process

    args = [
        "experiment=tiny",
        f"recipe={recipe}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    args += ["data.keep_duplicate_heldout=true", "trainer.max_steps=4", "module.max_new_tokens=8"]
    if recipe == "gad":
        args += ["module.warmup_steps=1", "module.group_size=2", "trainer.limit_val_batches=0"]
    else:
        args += ["teacher=local", f"teacher.path={os.environ['KDL_TINY']}", "module.eval_generation_limit=2"]
        args += [
            "module.eval_max_new_tokens=8",
            "trainer.limit_val_batches=1",
            "trainer.val_check_interval=2",
        ]
    done = kdl_process("distill", *args, env_dir=kdl_env)
    assert "training process 1 of" in done.stderr + done.stdout  # rank 1 trained along, then left
    assert "Traceback" not in done.stderr and "[ERROR]" not in done.stderr
    (student,) = artifacts(kdl_env, "distill")
    result = json.loads((student / "result.json").read_text())
    assert result["nll"] > 0 and (student / "student" / "config.json").is_file()


def test_pipeline_under_a_multi_process_trainer_is_refused(kdl_env):
    from tests.helpers.cli import kdl

    done = kdl(
        "pipeline", "experiment=tiny", "trainer=ddp", "trainer.accelerator=cpu", env_dir=kdl_env, check=False
    )
    assert (
        done.returncode == 1
        and "kdl distill ... trainer=ddp" in done.stderr
        and "Traceback" not in done.stderr
    )


GKD_WORKER = Path(__file__).parent / "scripts" / "ddp_gkd_worker.py"


def flat(state: dict[str, torch.Tensor], model: str = "student.") -> torch.Tensor:
    """One float64 vector of the parameters (and buffers) under ``model``."""
    return torch.cat([state[k].double().flatten() for k in sorted(state) if k.startswith(model)])


@pytest.mark.slow
def test_gkd_under_two_process_ddp_samples_per_rank_and_matches_one_process_on_the_same_rollouts(
    tiny_dir, tmp_path
):
    """Fully on-policy GKD, 2 ranks × 2 prompts: each rank samples its own rollouts (its own seed), the
    ranks' students stay identical after every step, and one process trained on the union of the ranks'
    rollouts (every generated token weighted alike, answers of unequal length) takes the same steps."""
    run_script(GKD_WORKER, tiny_dir, tmp_path / "ddp", "ddp")
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=True) for r in (0, 1)]
    run_script(
        GKD_WORKER, tiny_dir, tmp_path / "one", "replay", tmp_path / "ddp.rank0.pt", tmp_path / "ddp.rank1.pt"
    )
    one = torch.load(tmp_path / "one.rank0.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    steps = len(one["steps"])
    assert steps == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    lengths = [
        [int((r["steps"][s]["rollout"]["target_ids"] != -100).sum()) for r in ranks] for s in range(steps)
    ]
    assert any(a != b for a, b in lengths), f"the ranks' rollouts should hold unequal token counts: {lengths}"
    seeds = [[r["steps"][s]["seed"] for r in ranks] for s in range(steps)]
    assert all(a != b for a, b in seeds) and len({a for a, _ in seeds}) == steps  # per rank, per step
    before = [flat(r["initial"]) for r in ranks] + [flat(one["initial"])]
    assert torch.equal(before[0], before[1]) and torch.equal(before[0], before[2])
    for s in range(steps):
        after = [flat(r["steps"][s]["state"]) for r in ranks]
        assert torch.equal(after[0], after[1]), f"step {s}: the ranks' students differ"
        ddp_update, one_update = after[0] - before[0], flat(one["steps"][s]["state"]) - before[2]
        assert float(one_update.norm()) > 0
        cosine = torch.nn.functional.cosine_similarity(ddp_update, one_update, dim=0)
        assert float(cosine) > 0.99999, f"step {s}: update cosine {float(cosine)}"
        assert float((ddp_update - one_update).norm() / one_update.norm()) < 1e-4
        ddp_loss, one_loss = (r["steps"][s]["logged"]["train/loss"] for r in (ranks[0], one))
        assert (
            ranks[1]["steps"][s]["logged"]["train/loss"] == ddp_loss
        )  # the logged loss is the global batch's
        assert abs(ddp_loss - one_loss) <= 1e-5 * abs(one_loss), f"step {s}: loss {ddp_loss} vs {one_loss}"
        before = [after[0], after[1], flat(one["steps"][s]["state"])]


ROLLOUT_WORKER = Path(__file__).parent / "scripts" / "ddp_rollout_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gad", "minillm"])
def test_a_rollout_module_under_two_process_ddp_keeps_its_models_in_step_and_matches_one_process_on_the_same_rollouts(
    kind, tiny_dir, tmp_path
):
    """GAD (2 ranks × 2 prompts × G = 2 answers, one warm-up step then adversarial ones) and MiniLLM (2 ranks × 2
    prompts, whitened advantages, the pre-training term on): each rank samples its own answers, the models stay
    identical across the ranks after every step, and one process trained on the union of the ranks' rollouts
    takes the same steps (token means weigh every answer token, text token and pair alike across ranks of
    unequal counts; MiniLLM whitens by the global batch's statistics)."""
    run_script(ROLLOUT_WORKER, kind, tiny_dir, tmp_path / "ddp", "ddp")
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=True) for r in (0, 1)]
    run_script(
        ROLLOUT_WORKER,
        kind,
        tiny_dir,
        tmp_path / "one",
        "replay",
        tmp_path / "ddp.rank0.pt",
        tmp_path / "ddp.rank1.pt",
    )
    one = torch.load(tmp_path / "one.rank0.pt", weights_only=True)
    assert [r["world"] for r in ranks] == [2, 2] and one["world"] == 1
    steps = len(one["steps"])
    assert steps == len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 4
    first = 1 if kind == "gad" else 0  # GAD's first step is its discriminator's warm-up
    tokens = [
        [int(r["steps"][s]["rollout"]["response_mask"].sum()) for r in ranks] for s in range(first, steps)
    ]
    assert any(a != b for a, b in tokens), f"the steps should see unequal token counts: {tokens}"
    assert all(ranks[0]["steps"][s]["seed"] != ranks[1]["steps"][s]["seed"] for s in range(steps))

    models = (("student.", 1e-4), ("discriminator.", 2e-3)) if kind == "gad" else (("student.", 1e-4),)
    for model, tolerance in models:
        before = [flat(r["initial"], model) for r in (*ranks, one)]
        assert torch.equal(before[0], before[1]) and torch.equal(before[0], before[2])
        for s in range(steps):
            after = [flat(r["steps"][s]["state"], model) for r in (*ranks, one)]
            assert torch.equal(after[0], after[1]), f"step {s}: the ranks' {model} differ"
            ddp_update, one_update = after[0] - before[0], after[2] - before[2]
            if kind == "gad" and model == "student." and s == 0:  # the warm-up step trains D only
                assert float(one_update.norm()) == 0.0 and float(ddp_update.norm()) == 0.0
            else:
                assert float(one_update.norm()) > 0
                cosine = float(torch.nn.functional.cosine_similarity(ddp_update, one_update, dim=0))
                assert cosine > 0.99999, f"step {s}: {model} update cosine {cosine}"
                relative = float((ddp_update - one_update).norm() / one_update.norm())
                assert relative < tolerance, f"step {s}: {model} update differs by {relative:.2e}"
            before = after


def test_gad_under_ddp_without_unused_parameter_detection_is_one_line_and_kdl_sets_it(tiny_dir, tmp_path):
    """GAD's backward passes each reach one of its two models, which DDP refuses by default deep inside its
    reducer; the module says so before training, and kdl's trainer=ddp asks for the detection itself."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from kd_lightning.cli.trainer import trainer_factory
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.modules.gad import GADModule
    from tests.helpers.configs import compose_cfg

    module = GADModule(
        load_causal_lm(tiny_dir), optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        tokenizer=load_tokenizer(tiny_dir), eval_generation_limit=0,
    )  # fmt: skip
    module._trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"GADModule under DDP needs find_unused_parameters.*"
                       r"strategy='ddp_find_unused_parameters_true'"):  # fmt: skip
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True), world_size=2)
    module.setup("fit")  # accepted
    cfg = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", "logger=[]"], stage="distill")
    build = trainer_factory(cfg)
    trainer = build(tmp_path, "gad", overrides=dict(GADModule.trainer_overrides))
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True
    plain = build(tmp_path, "sft", overrides={})
    assert not plain.strategy._ddp_kwargs.get("find_unused_parameters")
