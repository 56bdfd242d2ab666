"""Every option of every config group composes, and its ``_target_`` instantiates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from kd_lightning.cli.build import loss_terms
from kd_lightning.cli.help import STAGES
from kd_lightning.cli.trainer import trainer_factory
from tests.helpers.assets import real_assets_available
from tests.helpers.configs import CONF, compose_cfg

GROUPS = sorted(
    str(p.relative_to(CONF))
    for p in CONF.rglob("*")
    if p.is_dir() and any(p.glob("*.yaml")) and p.name not in {"hydra", "local"}
)
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]
NEEDS_REAL_ASSETS = {("student", "smollm2_layers"), ("student", "smollm2"), ("teacher", "smollm2")}
NEEDS_VALUE = {
    ("data", "jsonl"): "data.path",
    ("data", "hf_dataset"): "data.path",
    ("tokenizer", "local"): "tokenizer.path",
    ("proxy", "local"): "proxy.path",
    ("teacher", "local"): "teacher.path",
    ("student", "local"): "student.path",
}


GENERATE_ONLY_STAGES = {"generate"}  # kdl generate has its own groups, not the pipeline's
GENERATE_GROUPS = {"teacher_backend", "generation_task"}
GENERATE_EXPERIMENTS = {"generate_smollm2_corpus"}
NEEDS_VALUE_GENERATE = {
    ("teacher_backend", "openai"): [
        "teacher_backend.model=m",
        "teacher_backend.api_key_env=KDL_CONFIG_TEST_KEY",
    ],
    ("generation_task", "instructions_file"): ["generation_task.path=x.txt"],
    ("generation_task", "augment"): [
        "generation_task.path=x.jsonl",
        "generation_task.task_instruction=Classify.",
    ],
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage, kdl_env):
    cfg = compose_cfg([] if stage in GENERATE_ONLY_STAGES else ["experiment=tiny"], stage)
    assert cfg.stage == stage


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(group, option, kdl_env):
    if group in GENERATE_GROUPS or (group, option) in {("experiment", e) for e in GENERATE_EXPERIMENTS}:
        bare = compose_cfg([f"{group}={option}"], "generate")
        if (group, option) in NEEDS_VALUE_GENERATE:  # the user must say what
            assert any(OmegaConf.is_missing(OmegaConf.select(bare, group), k) for k in ("model", "path"))
        cfg = compose_cfg([f"{group}={option}", *NEEDS_VALUE_GENERATE.get((group, option), [])], "generate")
        if group == "generation_task":
            assert instantiate(cfg.generation_task) is not None
        elif (group, option) == ("teacher_backend", "openai"):
            os.environ["KDL_CONFIG_TEST_KEY"] = "k"
            try:
                assert instantiate(cfg.teacher_backend).identity()["model"] == "m"
            finally:
                del os.environ["KDL_CONFIG_TEST_KEY"]
        else:
            assert OmegaConf.select(cfg, "teacher_backend.model_path") is not None
        return
    if group == "recipe":
        cfg = compose_cfg(
            ["experiment=tiny", f"recipe={option}", "teacher=local", f"teacher.path={os.environ['KDL_TINY']}"]
        )
        terms = loss_terms(cfg)
        assert terms and all(t.weight >= 0 for t in terms.values())
        assert instantiate(cfg.teacher).config.vocab_size > 0  # the command line still picks the teacher
        return
    if group in ("experiment", "sweep", "debug"):
        cfg = compose_cfg(
            [f"{group}={option}", "experiment=tiny"] if group != "experiment" else [f"{group}={option}"]
        )
        assert cfg is not None
        if group == "sweep":
            assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
        return
    if group == "loss":
        cfg = compose_cfg(["experiment=tiny", f"loss=[{option}]"])
        terms = loss_terms(cfg)
        assert list(terms) == [option] and terms[option].weight >= 0
        return
    if group == "logger":
        cfg = compose_cfg([f"logger=[{option}]"])  # the tiny experiment turns loggers off
        for node in cfg.logger.values():
            logger = instantiate(node, name="test")
            assert type(logger).__module__.startswith("lightning.pytorch.loggers")
        return
    # the tiny experiment sizes a random Llama student, so student options compose on the base config
    base = [f"tokenizer.path={os.environ['KDL_TINY']}"] if group == "student" else ["experiment=tiny"]
    overrides = [*base, f"{group}={option}"]
    if (group, option) in NEEDS_VALUE:
        bare = OmegaConf.select(compose_cfg([f"{group}={option}"]), group)
        assert OmegaConf.is_missing(bare, "path")  # the user must say where
        overrides.append(f"{NEEDS_VALUE[group, option]}={os.environ['KDL_TINY']}")
    if (group, option) == ("trainer", "ddp") and 0 < torch.cuda.device_count() < 2:
        overrides.append("trainer.devices=1")  # devices: 2 means two GPUs where one exists (auto accelerator)
    if group == "data" and option in ("alpaca_gpt35", "smollm2_self_instruct"):
        overrides.append("data.path=null")  # a shipped corpus reads no file (experiment=tiny names one)
    cfg = compose_cfg(overrides)
    node = OmegaConf.select(cfg, group.replace("/", "."))
    if group == "trainer":  # `compile` is ours (a callback), not a Trainer argument: the factory drops it
        node = OmegaConf.masked_copy(node, [k for k in node if k != "compile"])
    if group == "callbacks":
        for cb in node.values():
            assert instantiate(cb) is not None
        return
    if (group, option) in (("trainer", "gpu"), ("trainer", "fsdp")) and not torch.cuda.is_available():
        assert (
            node.accelerator == "gpu" and node.precision == "bf16-mixed"
        )  # instantiated only where a GPU exists
        if option == "fsdp":  # its strategy and wrap policy do build here
            strategy = instantiate(node.strategy)
            assert type(strategy).__name__ == "FSDPStrategy" and node.use_distributed_sampler is False
        return
    if group in ("tokenizer", "proxy", "paths"):
        return  # plain values, checked by the pipeline tests
    if (group, option) == ("teacher", "served"):  # the user must say which server and model
        assert all(OmegaConf.is_missing(node, k) for k in ("base_url", "model"))
        cfg = compose_cfg([*overrides, "teacher.base_url=http://127.0.0.1:9/v1", "teacher.model=m"])
        os.environ["KDL_TEACHER_API_KEY"] = "EMPTY"
        try:  # built without a request: the server is asked only when the store is built
            assert instantiate(cfg.teacher).identity()["model"] == "m"
        finally:
            del os.environ["KDL_TEACHER_API_KEY"]
        return
    if (group, option) in NEEDS_REAL_ASSETS:
        pytest.importorskip("gguf")
        if not real_assets_available() and not os.environ.get("CI"):  # in CI a missing asset fails below
            pytest.skip("needs `make setup` (shipped SmolLM2)")
    obj = instantiate(node)
    if group in ("optimizer", "scheduler"):
        assert callable(obj)
    else:
        assert obj is not None


def test_debug_fast_disables_loggers(kdl_env):
    cfg = compose_cfg(["experiment=tiny", "debug=fast"])
    assert cfg.trainer.fast_dev_run is True and cfg.logger is None


def test_unknown_loss_term_is_a_clear_error(kdl_env):
    cfg = compose_cfg(["experiment=tiny", "loss=[hard_ce]"])
    with pytest.raises(KeyError, match="not selected"):
        loss_terms(cfg, ["prior_kl"])


def test_every_config_file_is_covered():
    files = {str(p.relative_to(CONF).with_suffix("")) for p in CONF.rglob("*.yaml") if "local" not in p.parts}
    covered = {f"{g}/{o}" for g, o in OPTIONS} | {*STAGES, "kdl", "hydra/default"}
    assert files <= covered, files - covered


def test_loss_weight_names_say_what_they_weight(kdl_env):
    cfg = compose_cfg(["experiment=tiny", "prior_kl_weight=0.25"])
    with open_dict(cfg):
        terms = loss_terms(cfg)
    assert terms["prior_kl"].weight == 0.25 and terms["posterior_kl"].weight == 1.0
    assert Path(CONF / "kdl.yaml").read_text().count("_weight:") == 3


def test_a_config_composed_in_a_notebook_builds_trainers_with_loggers(kdl_env, tmp_path):
    """``hydra.compose`` sets no runtime config, so ``run_name`` (which interpolates it) cannot resolve there;
    the trainer's logger is named after the stage instead of failing (the quickstart notebook's path)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "pipeline", overrides=["experiment=tiny", "logger=[csv]", f"paths.output_dir={tmp_path}"]
        )
    HydraConfig.instance().cfg = None  # as in a fresh notebook kernel
    with pytest.raises(InterpolationResolutionError):
        _ = cfg.run_name
    trainer = trainer_factory(cfg)(tmp_path, "student sft")
    assert trainer.logger.name == "pipeline-student sft"
    recorded = (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert "${kdl_job_name:" in recorded and "prior_kl_weight" in recorded  # as written; the rest resolved
