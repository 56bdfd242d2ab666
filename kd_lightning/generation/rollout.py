"""Moved to :mod:`kd_lightning.rollout`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.rollout import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.rollout moved to kd_lightning.rollout; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
