"""TOOD R-50-FPN, anchor-based (delta-xywh on one square anchor per location), 1x: 42.4 box AP on COCO val2017."""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .tood_R_50_1x import dataloader, lr_multiplier, model, optimizer, train

model.head.anchor_type = "anchor_based"
