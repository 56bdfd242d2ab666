"""Names kept for users' configs and code from earlier releases, each with the version that removes it."""

from __future__ import annotations

import warnings

from kd_lightning.losses.terms import ForwardKL


class SoftLabelKL(ForwardKL):
    """Deprecated since 0.2.0, removed in v0.3.0: ``ForwardKL(kd_target=...)`` is the same term; ``soft_labels`` named the
    store it compares with, which is what ``kd_target`` names for every divergence."""

    def __init__(
        self,
        soft_labels: str,
        weight: float = 1.0,
        distill_temperature: float = 1.0,
        weighting: str = "none",
    ) -> None:
        warnings.warn(
            f"SoftLabelKL(soft_labels={soft_labels!r}) is ForwardKL(kd_target={soft_labels!r}), the same term; "
            "SoftLabelKL will be removed in v0.3.0 (in a loss YAML: _target_: kd_lightning.losses.ForwardKL, "
            f"kd_target: {soft_labels})",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(
            kd_target=soft_labels, weight=weight, distill_temperature=distill_temperature, weighting=weighting
        )
