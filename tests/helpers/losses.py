"""The loss terms the shipped configs offer (every ``conf/loss/*.yaml``), as the property tests take them."""

from __future__ import annotations

import copy
import functools

from hydra.utils import get_class
from omegaconf import OmegaConf

from kd_lightning.cli.build import loss_terms
from kd_lightning.environment import conf_dir
from kd_lightning.losses.terms import DivergenceTerm, declared_capability
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


WEIGHTED_FILES = [
    name
    for name in DIVERGENCE_FILES
    if declared_capability(loss_class(name), "weights_positions", ("forward",))
]
"""Divergences whose code applies position weights (``weighting=proxy_agreement|prior_reliability``)."""
DECOUPLED_FILES = [
    name for name in DIVERGENCE_FILES if declared_capability(loss_class(name), "decouples", ("forward",))
]
"""Divergences whose code honours ``decoupled``."""
SETTINGS = {
    "none": [],
    "proxy_agreement": ["weighting=proxy_agreement"],
    "prior_reliability": ["weighting=prior_reliability", "reliability_pseudocount=3.0"],
    "decoupled": ["decoupled=true", "target_weight=0.5", "nontarget_weight=2.0"],
    "decoupled_nontarget": ["decoupled=true", "target_weight=0.0"],
}
"""A term's settings beyond its file's (as ``++loss.<name>.<key>=<value>`` overrides), by label."""
CASES = (
    [(name, form, "none") for name in LOGIT_FILES for form in FORMS]
    + [
        (name, form, w)
        for w in ("proxy_agreement", "prior_reliability")
        for name in WEIGHTED_FILES
        for form in FORMS
    ]
    + [
        (name, form, d)
        for d in ("decoupled", "decoupled_nontarget")
        for name in DECOUPLED_FILES
        for form in FORMS
    ]
)
"""(loss file, target form, setting): every logit term on every form, each weightable divergence again under
both position weightings, and each divergence decoupled (with and without its target part)."""


def configured_term(name: str, weighting: str = "none"):
    """A fresh copy of the term ``conf/loss/<name>.yaml`` builds (composed once per process: composing is
    most of a property test's time)."""
    return copy.deepcopy(_composed_term(name, weighting))


@functools.cache
def _composed_term(name: str, weighting: str):
    overrides = ["experiment=tiny", f"loss=[{name}]"]
    overrides += [f"++loss.{name}.{setting}" for setting in SETTINGS[weighting]]
    cfg = compose_cfg(overrides)
    return loss_terms(cfg)[name]
