"""Moved to :mod:`kd_lightning.models.chat`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.models.chat import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.chat moved to kd_lightning.models.chat; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
