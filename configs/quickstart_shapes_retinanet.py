"""Detectron2's RetinaNet in place of TOOD in the quick start (configs/quickstart_shapes.py): a baseline for
tools/accuracy_study.py.

Shared with the TOOD quick start, as the same config nodes: the backbone (half-width ResNet-18 with BN from
scratch, 64-channel FPN, P6/P7 from P5 without a ReLU between them), the pixel mean/std of the RGB input, the data
(``tood_shapes_train`` / ``tood_shapes_val`` at 320 px), batch, optimizer, learning rate, schedule and
evaluation. The head has TOOD's quick-start widths (4 convs of 64 channels; one tower for classes and one for
boxes where the T-Head shares one between its tasks: 0.35M head parameters against 0.20M) and GroupNorm as TOOD's
and FCOS's heads (Detectron2's RetinaNet has none by default: ``model.head.norm=''``).

RetinaNet's own, as Detectron2 sets them: IoU-matched anchors (>= 0.5 positive, < 0.4 negative, each object's
best anchors too), focal loss, L1 loss on the box deltas, test score threshold 0.05 and NMS at IoU 0.5.

Anchors are half of Detectron2's sizes: 16..256 px on P3..P7 (two strides instead of four), three octave scales
and three aspect ratios. Detectron2's 32..512 suit COCO at 800 px; the shapes' boxes are 10..136 px (1st..99th
percentile of sqrt(area), median 34) in 320 px images, and with 32..512 px anchors 30% of them (63% of those
under 32 px) have no anchor at IoU >= 0.5, against 5% (10%) with 16..256.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch import RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from .quickstart_shapes import baseline_head, dataloader, lr_multiplier, optimizer, train
from .quickstart_shapes import model as _tood

model = L(RetinaNet)(
    backbone=_tood.backbone,
    head=baseline_head(RetinaNetHead, num_anchors=9),
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True),
    num_classes=_tood.num_classes,
    head_in_features=_tood.head_in_features,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    pixel_mean=_tood.pixel_mean,
    pixel_std=_tood.pixel_std,
    input_format=_tood.input_format,
)

# float32: Detectron2's own losses (fvcore's GIoU, index assignment) fail under CPU bfloat16 autocast.
train.amp.enabled = False
