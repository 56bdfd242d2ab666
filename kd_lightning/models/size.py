"""How big a model is, without loading it: parameters from its safetensors headers or its config."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kd_lightning.models.hub import resolve_model_path, trust_remote_code


def parameter_count(path: str) -> int:
    """Parameters of a model folder, from its safetensors headers, else built from its ``config.json`` on
    the meta device (no weights are read or allocated)."""
    folder = resolve_model_path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code()
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code())
        return sum(p.numel() for p in model.parameters())
    if not files:
        raise ValueError(
            f"{folder} has neither .safetensors files nor a config.json; kdl plan reads parameter counts from "
            "them (or set plan.proxy_parameters / plan.teacher_parameters)"
        )
    total = 0
    for file in files:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += int(np.prod(entry["shape"], dtype=np.int64))
    return total
