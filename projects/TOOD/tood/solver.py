"""Learning-rate schedules of the reference, as Detectron2 schedulers."""

import logging
from typing import Sequence

from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["WarmupMultiStepSchedule"]

logger = logging.getLogger(__name__)


class WarmupMultiStepSchedule(ParamScheduler):
    """mmdetection's ``LinearLR(begin=0, end=warmup_iters)`` + ``MultiStepLR(milestones)``, in iterations, for a run
    of ``max_iter`` iterations.

    The multiplier of iteration ``i`` (Detectron2's ``LRMultiplier`` evaluates it at ``i / max_iter``) is the product
    of the warm-up, ``warmup_factor + (1 - warmup_factor) * min(i / (warmup_iters - 1), 1)`` (mmengine's LinearLR
    reaches the full rate one iteration before its ``end``), and ``gamma ** k``, ``k`` counting the milestones
    ``<= i`` (a milestone is the first iteration at the lower rate). Any ``max_iter`` works: a run shorter than the
    warm-up ends within it, and milestones at or past ``max_iter`` are never reached (Detectron2's
    ``WarmupParamScheduler`` and ``MultiStepParamScheduler`` refuse both).
    """

    def __init__(
        self,
        max_iter: int,
        milestones: Sequence[int],
        warmup_iters: int = 500,
        warmup_factor: float = 0.001,
        gamma: float = 0.1,
    ):
        milestones = [int(m) for m in milestones]
        if int(max_iter) < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be positive and increasing, got {milestones}")
        if int(warmup_iters) < 1:
            raise ValueError(f"warmup_iters must be at least 1, got {warmup_iters}")
        self.max_iter = int(max_iter)
        self.milestones = milestones
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = warmup_factor
        self.gamma = gamma
        unreached = [m for m in milestones if m >= self.max_iter]
        if unreached:
            logger.info(f"LR steps at iterations {unreached} lie past max_iter={self.max_iter}: not reached.")

    def __call__(self, where: float) -> float:
        i = round(where * self.max_iter)
        warmup = min(i / max(self.warmup_iters - 1, 1), 1.0)
        factor = self.warmup_factor + (1 - self.warmup_factor) * warmup
        return factor * self.gamma ** sum(m <= i for m in self.milestones)
