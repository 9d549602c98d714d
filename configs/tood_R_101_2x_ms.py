"""TOOD R-101-FPN, 2x, multi-scale training: 46.1 box AP on COCO val2017."""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .tood_R_50_2x_ms import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "pretrained/resnet101_torchvision.pkl"
