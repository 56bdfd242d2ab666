"""Command-line overrides checked before Hydra composes them: a config group's option must exist.

Hydra's own message for an unknown option ("In 'kdl': Could not load 'loss/foo'") names neither the valid
options nor the fix; this check answers in one line with both, looking in every folder of the search path.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from kd_lightning.environment import conf_dir


def search_folders(argv: list[str]) -> list[Path]:
    """The config folders a run composes from: the shipped ones and ``hydra.searchpath`` file:// entries."""
    folders = [conf_dir()]
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            for entry in re.findall(r"file://([^,\]\s]+)", arg):
                folders.append(Path(entry).expanduser().resolve())
    return folders


def check_group_choices(stage: str, argv: list[str]) -> None:
    """Refuse an unknown option of a config group in one line that lists the valid ones.

    Hydra's own message ("Could not load 'loss/foo'") names neither the options nor the fix. Options are
    looked up in every folder of the search path, so a user's ``my_conf/loss/jeffreys.yaml`` counts.
    """
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException:
        return  # Hydra reports syntax errors itself
    folders = search_folders(argv)
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or override.package is not None or group.startswith("hydra"):
            continue
        dirs = [folder / group for folder in folders if (folder / group).is_dir()]
        if not dirs:
            continue  # a plain key, not a config group
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = value if isinstance(value, list) else [value]
        options = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
        for value in values:
            if value is None or str(value) == "null" or not isinstance(value, str | int | float):
                continue
            if str(value) not in options:
                print(
                    f"kdl {stage}: {group}={value} is not an option of the {group} group; choose from: "
                    f"{', '.join(options)} (or add my_conf/{group}/{value}.yaml and "
                    "hydra.searchpath=[file://./my_conf])",
                    file=sys.stderr,
                )
                raise SystemExit(2)


OPTIONAL_PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "parallel"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("sweep", "optuna_loss_weights"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
"""(group, option) → (the Hydra plugin module it needs, the kd_lightning extra that installs it)."""


def check_plugins(stage: str, argv: list[str]) -> None:
    """Refuse, in one line naming the extra to install, an option whose Hydra plugin is not installed
    (Hydra's own answer is its generic list of the options it has)."""
    for arg in argv:
        group, _, value = arg.lstrip("+").partition("=")
        needs = OPTIONAL_PLUGINS.get((group, value))
        if needs is None:
            continue
        module, extra = needs
        if importlib.util.find_spec(module.split(".")[0]) is None or _missing(module):
            print(
                f"kdl {stage}: {group}={value} needs a Hydra plugin that is not installed; "
                f'run `pip install "kd_lightning[{extra}]"`',
                file=sys.stderr,
            )
            raise SystemExit(2)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


def switched_option_hint(group: str, choice: str | None, keys: list[str], folders: list[Path]) -> str:
    """For a config group whose option failed to build: the keys its node holds that the option's own file
    does not set (an experiment set them for the option it chose), as removals that work when typed."""
    if not choice:
        return ""
    files = [folder / group / f"{choice}.yaml" for folder in folders]
    file = next((f for f in files if f.is_file()), None)
    if file is None:
        return ""
    own = set(_option_keys(file, folders, group))
    extra = [k for k in keys if k not in own and not k.startswith("_")]
    if not extra:
        return ""
    drops = " ".join(f"~{group}.{k}" for k in extra)
    return (
        f"; {group}={choice} does not set {', '.join(extra)} (set for another {group} option, e.g. by an "
        f"experiment): drop them with {drops}"
    )


def _option_keys(file: Path, folders: list[Path], group: str) -> list[str]:
    """The keys an option file sets, with those of the options it lists in its own defaults."""
    node = OmegaConf.load(file)
    keys = [str(k) for k in node if k != "defaults"]
    for entry in node.get("defaults") or []:
        name = entry if isinstance(entry, str) else None
        if name and name != "_self_":
            parent = next(
                (f / group / f"{name}.yaml" for f in folders if (f / group / f"{name}.yaml").is_file()), None
            )
            if parent is not None:
                keys += _option_keys(parent, folders, group)
    return keys


RENAMED_GROUPS = {"method": "module"}
"""Config groups of earlier releases and the group that replaced them (``method=minillm`` → ``module=minillm``)."""


def renamed_groups(argv: list[str]) -> list[str]:
    """Rewrite overrides of a renamed group (``method=gkd``, ``method.max_new_tokens=8``) with a notice."""
    out = []
    for arg in argv:
        prefix = arg.lstrip("+~")
        for old, new in RENAMED_GROUPS.items():
            if prefix.startswith((f"{old}=", f"{old}.")):
                updated = arg[: len(arg) - len(prefix)] + new + prefix[len(old) :]
                print(f"kdl: {old}= is now {new}= ({arg} → {updated})", file=sys.stderr)
                arg = updated
        out.append(arg)
    return out
