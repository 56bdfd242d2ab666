"""Moved to :mod:`kd_lightning.teachers.rows`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.rows import *  # noqa: F403

warnings.warn(
    "kd_lightning.modules.served_teacher moved to kd_lightning.teachers.rows; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
