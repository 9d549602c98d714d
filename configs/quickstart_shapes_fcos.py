"""Detectron2's FCOS in place of TOOD in the quick start (configs/quickstart_shapes.py): a baseline for
tools/accuracy_study.py.

Shared with the TOOD quick start, as the same config nodes: the backbone (half-width ResNet-18 with BN from
scratch, 64-channel FPN, P6/P7 from P5), the pixel mean/std of the RGB input, the data (``tood_shapes_train`` /
``tood_shapes_val`` at 320 px), batch, optimizer, learning rate, schedule and evaluation. The head has TOOD's
quick-start widths (4 convs of 64 channels; one tower for classes and one for boxes where the T-Head shares one
between its tasks: 0.30M head parameters against 0.20M) and FCOS's GroupNorm (32 groups: ``norm="GN"``, as
:data:`tood.compat.RETINANET_HEAD_GN` spells it for every Detectron2).

FCOS's own, as Detectron2 sets them: one point per location, positive inside the object's centre region (1.5
strides) on the level whose range holds its largest regression distance (Detectron2 fixes the ranges' limits at
64, 128, 256 and 512 px: the shapes' boxes, at most 159 px, get no positives on P6 and P7), focal loss, GIoU box
loss, centerness, and test scores sqrt(class x centerness) thresholded at 0.2, NMS at IoU 0.6.

The one difference in the shared part: Detectron2's FCOS computes P6/P7 from P5 with a ReLU before P7; here P7
comes from P6 without it, as in TOOD's reference, so that the backbone is exactly the quick start's.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from detectron2.config import LazyCall as L
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

from .quickstart_shapes import baseline_head, dataloader, lr_multiplier, optimizer, train
from .quickstart_shapes import model as _tood

model = L(FCOS)(
    backbone=_tood.backbone,
    head=baseline_head(FCOSHead),
    num_classes=_tood.num_classes,
    head_in_features=_tood.head_in_features,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    test_score_thresh=0.2,
    test_nms_thresh=0.6,
    pixel_mean=_tood.pixel_mean,
    pixel_std=_tood.pixel_std,
)

# float32: Detectron2's own losses (fvcore's GIoU, index assignment) fail under CPU bfloat16 autocast.
train.amp.enabled = False
