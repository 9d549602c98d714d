"""Learning-rate schedules of the reference, as Detectron2 schedulers."""

from typing import Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

__all__ = ["warmup_multistep_schedule"]


def warmup_multistep_schedule(
    max_iter: int,
    milestones: Sequence[int],
    warmup_iters: int = 500,
    warmup_factor: float = 0.001,
    gamma: float = 0.1,
) -> WarmupParamScheduler:
    """mmdetection's ``LinearLR(begin=0, end=warmup_iters)`` + ``MultiStepLR(milestones)``, in iterations.

    The multiplier of iteration ``i`` (Detectron2's ``LRMultiplier`` evaluates it at ``i / max_iter``):
    ``warmup_factor + (1 - warmup_factor) * i / (warmup_iters - 1)`` while ``i < warmup_iters - 1`` (mmengine's
    LinearLR reaches the full rate one iteration before its ``end``), then ``gamma ** k`` where ``k`` counts the
    milestones ``<= i`` (a milestone is the first iteration at the lower rate).
    """
    return WarmupParamScheduler(
        MultiStepParamScheduler(
            values=[gamma**k for k in range(len(milestones) + 1)],
            milestones=list(milestones),
            num_updates=max_iter,
        ),
        warmup_factor=warmup_factor,
        warmup_length=(warmup_iters - 1) / max_iter,
        warmup_method="linear",
    )
