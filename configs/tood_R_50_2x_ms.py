"""TOOD R-50-FPN, 2x (24 epochs) with multi-scale training (shorter side 480-800): 44.5 box AP on COCO val2017."""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .common.data.coco import dataloader_multiscale as dataloader
from .common.schedule import epochs
from .common.schedule import lr_multiplier_2x as lr_multiplier
from .tood_R_50_1x import model, optimizer, train

train.max_iter = epochs(24)  # the ATSS warm-up stays 4 epochs
