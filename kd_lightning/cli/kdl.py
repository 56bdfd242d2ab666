"""The ``kdl`` console script: answers help and version at once, then hands stages to the Hydra app.

``kdl --help`` should not wait for torch, Lightning and transformers to import (seconds on a small CPU),
so the heavy CLI module (:mod:`kd_lightning.cli.main`) is imported only when a stage runs.
"""

from __future__ import annotations

import sys

from kd_lightning.cli.help import answer_without_hydra


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``kdl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["report"] and answer_without_hydra(argv):
        return
    from kd_lightning.cli import (
        main as app,  # deferred for start-up time only (no cycle: app never imports us)
    )

    app.main(argv)


if __name__ == "__main__":
    main()
