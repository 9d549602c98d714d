"""TOOD ResNeXt-101-64x4d-FPN with DCNv2 in backbone stages c4-c5 and the head's first 2 interactive convs, 2x,
multi-scale training: 51.1 box AP on COCO test-dev.

ImageNet initialisation: that of configs/tood_X_101_64x4d_2x_ms.py (pretrained/resnext101_64x4d_open-mmlab.pkl, see
there); the DCNv2 offset convs start at zero.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from .tood_X_101_64x4d_2x_ms import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.deform_on_per_stage = [False, False, True, True]
model.head.num_dcn = 2
