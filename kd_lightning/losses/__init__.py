"""Loss terms and their pure functional forms."""

from kd_lightning.losses.functional import hard_cross_entropy, masked_mean, sparse_target_kl
from kd_lightning.losses.terms import HardCrossEntropy, LossTerm, SoftLabelKL

__all__ = [
    "HardCrossEntropy",
    "LossTerm",
    "SoftLabelKL",
    "hard_cross_entropy",
    "masked_mean",
    "sparse_target_kl",
]
