"""Moved to :mod:`kd_lightning.teachers.openai_client`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.openai_client import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.openai_client moved to kd_lightning.teachers.openai_client; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)
