"""Stages: plain functions that compose the artifact builders into what ``kdl <stage>`` runs.

The CLI (:mod:`kd_lightning.cli.main`) turns the composed config into a :class:`StageContext` (and, for
students, :class:`~kd_lightning.stages.train.StudentRun`) and maps each stage name to one function here.
Nothing in this package imports Hydra; a notebook or script can build the same objects by hand.
"""

from kd_lightning.stages.context import StageContext

__all__ = ["StageContext"]
