"""Loss terms and their pure functional forms (see ``divergences`` for the target format)."""

from kd_lightning.losses.atkd import AdaptiveTeachingKD
from kd_lightning.losses.cross_vocab import (
    CrossVocabularyTerm,
    GoldHybrid,
    UniversalLogitDistillation,
    uld,
    uld_per_position,
)
from kd_lightning.losses.decoupled import decoupled_kl
from kd_lightning.losses.deprecated import SoftLabelKL
from kd_lightning.losses.divergences import (
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    sparse_target_kl,
    total_variation,
)
from kd_lightning.losses.features import HiddenStateLoss, hidden_cosine_distance, hidden_mse
from kd_lightning.losses.functional import hard_cross_entropy, masked_mean
from kd_lightning.losses.terms import (
    AdaptiveKL,
    DivergenceTerm,
    ForwardKL,
    GeneralizedJSD,
    HardCrossEntropy,
    LossTerm,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)

__all__ = [
    "AdaptiveKL",
    "AdaptiveTeachingKD",
    "CrossVocabularyTerm",
    "DivergenceTerm",
    "ForwardKL",
    "GeneralizedJSD",
    "GoldHybrid",
    "HardCrossEntropy",
    "HiddenStateLoss",
    "LossTerm",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "SoftLabelKL",
    "TotalVariation",
    "UniversalLogitDistillation",
    "adaptive_kl",
    "decoupled_kl",
    "forward_kl",
    "generalized_jsd",
    "hard_cross_entropy",
    "hidden_cosine_distance",
    "hidden_mse",
    "masked_mean",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_target_kl",
    "total_variation",
    "uld",
    "uld_per_position",
]
