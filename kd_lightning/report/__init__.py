"""``kdl report <folder>...``: a sweep's runs as one markdown table and PNG plots.

Two sources, whichever a folder holds:

* **Hydra job folders** (``multirun/<stage>/<time>/<job>/``): ``.hydra/overrides.yaml`` gives the swept
  settings, ``<stage>_result.json`` the figures (``kdl pipeline`` rows per student, ``kdl distill``,
  ``kdl evaluate``, ``kdl fidelity``), and the CSV logger's ``metrics.csv`` the loss curves. This source is
  exact for artifacts a later job reused from the cache (a student trained once appears in every job).
* **wandb offline runs** (``wandb/offline-run-*/run-*.wandb``, read without a wandb server): the run's
  config, group, tags, its last logged values (``heldout/nll`` ...) and its history (loss curves). Swept
  settings are the config keys that differ between runs.

A row that several jobs share (the same student folder) is shown once, with ``*`` for the settings it does
not depend on. No Hydra here: the console script parses plain arguments.
"""

from kd_lightning.report.runs import ANY, METRICS, ReportError, Run, collect_runs, markdown_table
from kd_lightning.report.write import main, write_report

__all__ = ["ANY", "METRICS", "ReportError", "Run", "collect_runs", "main", "markdown_table", "write_report"]
