"""OmegaConf resolvers the configs use (``${kdl_run_name:...}``, ``${kdl_tiny:}`` ...), registered on import."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kd_lightning.cli.help import stage_help_resolver
from kd_lightning.environment import env_setting
from kd_lightning.models.tiny_assets import tiny_assets_folder
from kd_lightning.stages.registry import KINDS, SOFT_LABELS


def wandb_mode() -> str:
    """online when an API key is configured, offline otherwise (runs can be synced later)."""
    if env_setting("WANDB_MODE"):
        return str(env_setting("WANDB_MODE"))
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text()
    )
    return "online" if has_key else "offline"


def run_tags(stage: str, extra: Any = None) -> list[str]:
    """wandb tags: the stage plus ``run_tags`` (sweep files set these so a dashboard can filter them)."""
    extra = list(extra or [])
    return list(dict.fromkeys([stage, *(str(tag) for tag in extra)]))


def split_overrides(text: str) -> list[str]:
    """``a=1,b=[x,y],c={k: v}`` → ``["a=1", "b=[x,y]", "c={k: v}"]``: commas inside brackets or escaped stay."""
    items, depth, current, escaped = [], 0, "", False
    for char in text:
        if escaped:
            current, escaped = current + char, False
            continue
        if char == "\\":
            current, escaped = current + char, True
            continue
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current] if current else items


def short_run_name(override_dirname: str, limit: int = 80) -> str:
    """A sweep job's run name from its overrides: ``ngram_order=3,sampling_rounds=16``.

    Keys are cut to their last component; ``experiment``, ``sweep``, ``logger``, ``run_name`` and
    ``hydra.*`` overrides are dropped; long names end in a hash, so folder names stay legal.
    """
    kept = []
    for item in split_overrides(override_dirname):
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key or key.split(".")[0] in ("experiment", "sweep", "logger", "run_name", "hydra"):
            continue
        kept.append(f"{key.rsplit('.', 1)[-1]}={value}".replace("/", "_"))
    name = ",".join(kept) or "run"
    if len(name) > limit:
        name = name[: limit - 9] + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


def job_name(stage: str, mode: Any, override_dirname: str | None) -> str:
    """A run's name: the stage, or in a multirun the stage and the job's own overrides
    (``distill-prior_kl_weight=0.5``), so a sweep's runs are told apart on a dashboard."""
    if "MULTIRUN" not in str(mode):
        return stage
    return f"{stage}-{short_run_name(override_dirname or '')}"


def job_group(stage: str, mode: Any, sweep_dir: str | None) -> str:
    """A run's group: the stage, or in a multirun one group per sweep, named after its folder
    (``distill-sweep-2026-12-04_10-00-00-123``), so its jobs land together on a dashboard."""
    if "MULTIRUN" not in str(mode):
        return stage
    return f"{stage}-sweep-{Path(str(sweep_dir or 'multirun')).name}"


RESOLVERS = {
    "kdl_wandb_mode": wandb_mode,
    "kdl_run_name": short_run_name,
    "kdl_job_name": job_name,
    "kdl_job_group": job_group,
    "kdl_tags": run_tags,
    "kdl_pid": os.getpid,  # output folders: two runs in the same second never share one
    "kdl_stage_help": stage_help_resolver(
        tuple(KINDS), tuple(e.display for e in SOFT_LABELS if e.compared)
    ),  # kdl <stage> --help renders hydra.help.template
    "kdl_tiny": lambda: str(tiny_assets_folder()),  # experiment=tiny: $KDL_TINY, or tiny assets built once
}

for _name, _resolver in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
