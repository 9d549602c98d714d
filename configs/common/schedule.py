"""The reference's schedules (counted in epochs) in iterations.

The rule (mmdetection's sampler): one epoch is ``ceil(N / total batch)`` iterations, N being the training images
drawn from (with ``filter_empty``, those with at least one box). Its 8 GPUs x 2 images give
``ceil(ceil(N / 8) / 2)``, the same number. COCO train2017: N = 117,266 at batch 16 -> 7330 iterations.

``train.iters_per_epoch`` holds that number and every length of the schedule interpolates it (the ATSS warm-up,
the LR steps, the end, the checkpoints), so one value sets them all. When the training set gives another epoch
length (a user's own dataset, another batch), ``tood.engine.setup`` sets ``train.iters_per_epoch`` to it (counted
from the annotation file) and logs the change, unless it was given on the command line. ``train.max_iter`` can be
overridden alone: LR steps, the ATSS -> TAL switch and periods past it are not reached, and setup says so.
"""

import math

from detectron2.config import LazyCall as L

from tood.data import COCO_2017_TRAIN_IMAGES
from tood.solver import WarmupMultiStepSchedule


def iters_per_epoch(num_images: int, total_batch_size: int) -> int:
    return math.ceil(num_images / total_batch_size)


def epochs(n: int) -> str:
    """``n`` epochs in iterations, following ``train.iters_per_epoch``."""
    return f"${{tood_schedule_fraction:${{train.iters_per_epoch}},{n},1}}"


def lr_multiplier(step_epochs):
    """Linear warm-up over 500 iterations from 0.001x, then x0.1 at each of ``step_epochs``."""
    return L(WarmupMultiStepSchedule)(
        max_iter="${train.max_iter}",
        milestones=[epochs(e) for e in step_epochs],
        warmup_iters=500,
        warmup_factor=0.001,
    )


COCO_ITERS_PER_EPOCH = iters_per_epoch(COCO_2017_TRAIN_IMAGES, 16)
lr_multiplier_1x = lr_multiplier([8, 11])  # 12 epochs
lr_multiplier_2x = lr_multiplier([16, 22])  # 24 epochs
