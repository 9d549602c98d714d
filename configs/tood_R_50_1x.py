"""TOOD R-50-FPN, anchor-free, 1x (12 epochs) at batch 16, single scale: 42.4 box AP on COCO val2017.

ImageNet initialisation: tools/convert_torchvision_resnet.py writes pretrained/resnet50_torchvision.pkl.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .common.data.coco import dataloader
from .common.models.tood import model
from .common.optim import SGD as optimizer
from .common.schedule import lr_multiplier_1x as lr_multiplier
from .common.schedule import max_iter_1x
from .common.train import train

train.max_iter = max_iter_1x
train.init_checkpoint = "pretrained/resnet50_torchvision.pkl"
