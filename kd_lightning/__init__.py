"""kd_lightning: knowledge distillation of language models with PyTorch Lightning and Hydra."""

from kd_lightning.environment import package_version

__version__ = package_version()
