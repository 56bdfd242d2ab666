"""Composing the shipped configs in a test, as the CLI would (without running a stage)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import kd_lightning.cli.resolvers  # noqa: F401  (registers the configs' ${kdl_...} resolvers)
from kd_lightning.environment import conf_dir

CONF = conf_dir()


def compose_cfg(overrides: list[str], stage: str = "pipeline"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(
            Path.cwd() / "outputs"
        )  # set by Hydra's runtime when launched from the CLI
    return cfg
