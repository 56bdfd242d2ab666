"""How the weights of the distillation terms change over training (``kd_weight_schedule``).

A fluent student can lose from distillation targets that are worse than it is; a ramp lets it take the hard
CE first and the estimates later, a decay the other way round. The schedule scales the weight of every
divergence term (every term that compares the student with a target distribution; hard CE keeps its own)
by a factor in [0, 1] of the training progress ``t = step / total steps``, logged per step as
``train/kd_weight_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("constant", "ramp_up", "decay")


@dataclass(frozen=True)
class KDWeightSchedule:
    """The factor on every divergence term's weight at training progress ``t`` in [0, 1].

    Args:
        kind: ``constant`` (1 throughout), ``ramp_up`` (0 → 1 linearly over the first ``fraction`` of the
            steps, then 1) or ``decay`` (1, then → 0 linearly over the last ``fraction`` of the steps).
        fraction: the share of the steps the ramp or the decay takes, in (0, 1].
    """

    kind: str = "constant"
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"kd_weight_schedule.kind must be one of {', '.join(SCHEDULES)}, got {self.kind!r}"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"kd_weight_schedule.fraction must be in (0, 1], got {self.fraction}")

    def factor(self, step: int, total_steps: int) -> float:
        """The scale at optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.kind == "constant" or total_steps <= 0:
            return 1.0
        t = min(max(step / total_steps, 0.0), 1.0)
        if self.kind == "ramp_up":
            return min(1.0, t / self.fraction)
        return min(1.0, (1.0 - t) / self.fraction)
