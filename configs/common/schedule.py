"""Step learning-rate schedules of the reference, in iterations of a total batch of 16.

One COCO epoch is ~7330 iterations at batch 16; as Detectron2, 12 epochs ("1x") are 90k iterations. The
schedulers are scale-invariant (milestones and warm-up are fractions of ``num_updates``): overriding
``train.max_iter`` stretches or shrinks the whole schedule, as it does the ATSS warm-up of the model.
"""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

ITERS_PER_EPOCH = 7500


def step_schedule(epochs, step_epochs, warmup_iters=500, warmup_factor=0.001):
    """LR x0.1 at each of ``step_epochs``, after a linear warm-up from ``warmup_factor`` over ``warmup_iters``."""
    total = epochs * ITERS_PER_EPOCH
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[10.0**-i for i in range(len(step_epochs) + 1)],
            milestones=[e * ITERS_PER_EPOCH for e in step_epochs],
            num_updates=total,
        ),
        warmup_length=warmup_iters / total,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


lr_multiplier_1x = step_schedule(12, [8, 11])
lr_multiplier_2x = step_schedule(24, [16, 22])
max_iter_1x = 12 * ITERS_PER_EPOCH
max_iter_2x = 24 * ITERS_PER_EPOCH
