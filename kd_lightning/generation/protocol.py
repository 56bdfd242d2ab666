"""Moved to :mod:`kd_lightning.teachers.protocol`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.protocol import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.protocol moved to kd_lightning.teachers.protocol; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
