"""TOOD R-50-FPN, 2x (24 epochs) with multi-scale training (shorter side 480-800): 44.5 box AP on COCO val2017."""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .common.data.coco import dataloader_multiscale as dataloader
from .common.models.tood import model
from .common.optim import SGD as optimizer
from .common.schedule import lr_multiplier_2x as lr_multiplier
from .common.schedule import max_iter_2x
from .common.train import train

train.max_iter = max_iter_2x
train.init_checkpoint = "pretrained/resnet50_torchvision.pkl"
# The reference's ATSS warm-up stays 4 epochs (its head's initial_epoch) in the 24-epoch schedule.
model.tal_start_iter = "${tood_schedule_fraction:${train.max_iter},4,24}"
