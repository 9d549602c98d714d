"""TOOD ResNeXt-101-64x4d-FPN, 2x, multi-scale training: 47.6 box AP on COCO val2017.

ImageNet initialisation, the reference's ``open-mmlab://resnext101_64x4d``: download
https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth and convert it with
``tools/convert_torchvision_resnet.py resnext101_64x4d-ee2c6f71.pth pretrained/resnext101_64x4d_open-mmlab.pkl``.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from detectron2.config import LazyCall as L

from tood.backbone import FrozenStatsBatchNorm2d
from tood.backbone_dcn import make_resnet_stages

from .tood_R_50_2x_ms import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages = L(make_resnet_stages)(
    depth=101,
    num_groups=64,
    width_per_group=4,
    stride_in_1x1=False,
    norm=FrozenStatsBatchNorm2d,
)
train.init_checkpoint = "pretrained/resnext101_64x4d_open-mmlab.pkl"
