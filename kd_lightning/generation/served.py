"""Moved to :mod:`kd_lightning.teachers.served`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.served import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.served moved to kd_lightning.teachers.served; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
