"""TOOD R-50-FPN, anchor-free, 1x (12 epochs) at batch 16, single scale: 42.4 box AP on COCO val2017.

ImageNet initialisation: tools/convert_torchvision_resnet.py writes pretrained/resnet50_torchvision.pkl.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .common.data.coco import dataloader
from .common.models.tood import model
from .common.optim import SGD as optimizer
from .common.schedule import COCO_ITERS_PER_EPOCH, epochs
from .common.schedule import lr_multiplier_1x as lr_multiplier
from .common.train import train

# Epochs as iterations: configs/common/schedule.py says how one epoch is counted.
train.iters_per_epoch = COCO_ITERS_PER_EPOCH
train.max_iter = epochs(12)
model.tal_start_iter = epochs(4)  # the reference's ATSS warm-up: its head's initial_epoch=4
train.checkpointer.period = epochs(1)
train.eval_period = epochs(1)
train.init_checkpoint = "pretrained/resnet50_torchvision.pkl"
