"""Where a model slot's value lives: a shipped name, a local folder, or a Hugging Face hub id.

A hub id (``Qwen/Qwen2.5-7B-Instruct``, optionally ``@revision``) is downloaded once into the Hugging Face
cache (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` it is read from the cache only. It is first resolved to its
snapshot folder, so everything downstream (fingerprints, cache keys, loading with ``local_files_only=True``)
sees a local folder. Remote code never runs unless the user sets ``trust_remote_code=true``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kd_lightning.environment import env_setting
from kd_lightning.models.shipped import SHIPPED_MODELS, AssetError, shipped_folder

_TRUST_REMOTE_CODE = False


def set_trust_remote_code(enabled: bool) -> None:
    """Allow (or forbid, the default) models and tokenizers whose code lives in their hub repository."""
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(enabled)


def trust_remote_code() -> bool:
    """Whether loading may run code from a model's repository (off unless the user turned it on)."""
    return _TRUST_REMOTE_CODE


# ``org/name`` or ``name`` (hub repository ids), optionally ``@revision``; never a path-like string
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?$")


# what a model slot needs from a hub repository (weights are added below: safetensors, else .bin)
HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.safetensors"]


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Map a model slot value to a local folder: ``smollm2``, a local HF folder, or a hub id."""
    text = str(path)
    if text in SHIPPED_MODELS:
        return shipped_folder(text)
    folder = Path(text).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise AssetError(
                f"model path {folder} exists but holds no config.json; give a folder written by "
                "save_pretrained, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or `smollm2`."
            )
        return folder
    match = HUB_ID.match(text)
    if match is None or text.startswith((".", "~")):
        raise AssetError(
            f"model path {text!r} is neither an existing folder nor a hub id (org/name); give a folder "
            "written by save_pretrained, a hub id, or `smollm2` for the shipped model."
        )
    return hub_snapshot(match["repo"], match["revision"], trust_remote_code())


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    explicit = env_setting("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = (
        env_setting("HF_HOME")
        or Path(env_setting("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/true/yes/on), read at call time."""
    return (env_setting("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")


_SNAPSHOTS: dict[tuple, Path] = {}


def hub_snapshot(repo_id: str, revision: str | None = None, with_code: bool = False) -> Path:
    """The local snapshot folder of a hub model: downloaded once, then read from the HF cache.

    Honours ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` (cache only). Only configs, tokenizer
    files and one weight format are fetched; ``*.py`` only when remote code is trusted. Resolved once per
    process.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    memo = (repo_id, revision, with_code, str(cache), offline)
    if memo in _SNAPSHOTS:
        return _SNAPSHOTS[memo]
    patterns = HUB_FILES + (["*.py"] if with_code else [])
    where = repo_id + (f"@{revision}" if revision else "")

    def download(allow: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow, cache_dir=cache, local_files_only=offline
            )
        )

    try:
        folder = download(patterns)
        if not any(folder.glob("*.safetensors")):  # older repositories: PyTorch .bin weights only
            folder = download([*patterns, "*.bin"])
    except LocalEntryNotFoundError as err:
        how = "HF_HUB_OFFLINE=1 is set" if offline else "the hub could not be reached"
        raise AssetError(
            f"model {where} is not in the Hugging Face cache ({cache}) and {how}; download it once online "
            f"(`huggingface-cli download {repo_id}`), point HF_HOME at a cache that has it, or give a local "
            f"folder (no folder {where!r} exists here)"
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise AssetError(
            f"model {where}: {type(err).__name__} on the hub (check the id and revision; gated models need "
            "`huggingface-cli login`), and no local folder of that name exists"
        ) from err
    except HfHubHTTPError as err:
        raise AssetError(f"model {where}: the hub answered {err}") from err
    if not (folder / "config.json").is_file():
        raise AssetError(f"hub model {where} has no config.json; it is not a transformers model repository")
    _SNAPSHOTS[memo] = folder
    return folder
