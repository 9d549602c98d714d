"""TOOD R-50-FPN, anchor-free, as the reference (mmdetection 3.3 configs/tood/tood_r50_fpn_1x_coco.py)."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet

from tood.backbone import LastLevelP6P7NoReLU
from tood.head import TOODHead
from tood.losses import TOODLoss
from tood.meta_arch import TOOD

model = L(TOOD)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            # torchvision-style ResNet: the stride sits in the 3x3 conv.
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
            out_features=["res3", "res4", "res5"],
            freeze_at=2,  # stem and res2 frozen, as the reference's frozen_stages=1
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        top_block=L(LastLevelP6P7NoReLU)(in_channels=256, out_channels=256, in_feature="p5"),
    ),
    head=L(TOODHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes="${..num_classes}",
        feat_channels=256,
        stacked_convs=6,
        strides=[8, 16, 32, 64, 128],
        anchor_type="anchor_free",
    ),
    criterion=L(TOODLoss)(num_classes="${..num_classes}"),
    num_classes=80,
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    # ATSS warm-up for the first 4 of 12 epochs, expressed as a fraction of the schedule.
    tal_start_iter="${tood_schedule_fraction:${train.max_iter},4,12}",
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
