"""Packaging beyond ``pyproject.toml``: the repository's top-level ``conf/`` ships as ``kd_lightning/conf``.

The Hydra configs stay at the top of the repository (where the layout puts them) and are installed as
package data, so an installed ``kdl`` composes them without a checkout (see ``kd_lightning/environment.py``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["kd_lightning", "kd_lightning.*"]), "kd_lightning.conf"],
    package_dir={"kd_lightning.conf": "conf"},
    package_data={
        "kd_lightning": ["generation/seed_tasks.jsonl", "corpora/*.jsonl", "corpora/*.json"],
        "kd_lightning.conf": ["*.yaml", "**/*.yaml"],
    },
    exclude_package_data={"kd_lightning.conf": ["local/*", "local/**/*"]},
)
