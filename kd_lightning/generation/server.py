"""Moved to :mod:`kd_lightning.teachers.server`; this path will be removed in v0.3.0."""

import warnings

from kd_lightning.teachers.server import *  # noqa: F403

warnings.warn(
    "kd_lightning.generation.server moved to kd_lightning.teachers.server; the old path will be removed in v0.3.0",
    FutureWarning,
    stacklevel=2,
)

if __name__ == "__main__":  # python -m kd_lightning.generation.server still starts the server
    main()  # noqa: F405
