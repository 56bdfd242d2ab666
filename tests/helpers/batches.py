"""Batches as tests write them: dicts in the key form of :data:`kd_lightning.data.batch.SCHEMA`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kd_lightning.data.batch import PositionBatch, _from_fields


def position_batch(fields: Mapping[str, torch.Tensor]) -> PositionBatch:
    """The typed batch a loss term takes, from a dict of (B, T, ...) fields (``target_ids``, ``prior_ids`` ...)."""
    return _from_fields(fields)
