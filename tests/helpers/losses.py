"""The loss terms the shipped configs offer (every ``conf/loss/*.yaml``), as the property tests take them."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import OmegaConf

from kd_lightning.cli.build import loss_terms
from kd_lightning.environment import conf_dir
from kd_lightning.losses.terms import DivergenceTerm
from tests.helpers.configs import compose_cfg

B, T, V = 2, 6, 17
K_TAIL = 5  # a sparse store that keeps 5 of 17 ids: the rest of the mass is in the tail bucket
FORMS = {"teacher": ("teacher", V), "prior": ("prior", V), "prior_tail": ("prior", K_TAIL)}
"""form → (target name, stored ids per position)."""
LOSS_FILES = sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml"))


def loss_class(name: str) -> type:
    (node,) = OmegaConf.load(conf_dir() / "loss" / f"{name}.yaml").values()
    return get_class(node["_target_"])


DIVERGENCE_FILES = [name for name in LOSS_FILES if issubclass(loss_class(name), DivergenceTerm)]
LOGIT_FILES = [name for name in LOSS_FILES if loss_class(name).reads_logits]
FEATURE_FILES = [name for name in LOSS_FILES if not loss_class(name).reads_logits]


def configured_term(name: str):
    cfg = compose_cfg(["experiment=tiny", f"loss=[{name}]"])
    return loss_terms(cfg)[name]
