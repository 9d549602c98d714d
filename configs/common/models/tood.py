"""TOOD R-50-FPN, anchor-free, as the reference (mmdetection 3.3 configs/tood/tood_r50_fpn_1x_coco.py).

The backbone is Detectron2's RetinaNet R-50-FPN (``common/models/retinanet.py``) with the reference's choices:
the stride in the 3x3 conv (torchvision style), BatchNorm with fixed statistics but trained weight and bias in
res3-res5 (``norm_eval=True``), stem and res2 frozen, and P6/P7 computed from P5 without a ReLU in between.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from tood.backbone import FrozenStatsBatchNorm2d, LastLevelP6P7NoReLU
from tood.head import TOODHead
from tood.losses import TOODLoss
from tood.meta_arch import TOOD

backbone = model_zoo.get_config("common/models/retinanet.py").model.backbone
backbone.bottom_up.stem.norm = FrozenStatsBatchNorm2d
backbone.bottom_up.stages.stride_in_1x1 = False
backbone.bottom_up.stages.norm = FrozenStatsBatchNorm2d
backbone.bottom_up.freeze_at = 2  # stem and res2, as the reference's frozen_stages=1
backbone.top_block = L(LastLevelP6P7NoReLU)(in_channels=256, out_channels="${..out_channels}", in_feature="p5")

model = L(TOOD)(
    backbone=backbone,
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
    # ATSS warm-up for the first 4 of 12 epochs, as a fraction of the schedule (the zoo configs count epochs).
    tal_start_iter="${tood_schedule_fraction:${train.max_iter},4,12}",
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
)
