"""Shared fixtures: tiny assets built in-process (no downloads), isolated artifact folders."""

from __future__ import annotations

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
