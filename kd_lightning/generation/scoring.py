"""Moved to :mod:`kd_lightning.teachers.scoring`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.scoring import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.scoring moved to kd_lightning.teachers.scoring; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
