"""TOOD R-101-FPN with DCNv2 in backbone stages c3-c5 and the head's first 2 interactive convs, 2x, multi-scale
training: 49.3 box AP on COCO val2017."""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from detectron2.config import LazyCall as L

from tood.backbone import FrozenStatsBatchNorm2d
from tood.backbone_dcn import make_resnet_stages

from .tood_R_101_2x_ms import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages = L(make_resnet_stages)(
    depth=101,
    deform_on_per_stage=[False, True, True, True],
    stride_in_1x1=False,
    norm=FrozenStatsBatchNorm2d,
)
model.head.num_dcn = 2
