"""Quick start: TOOD trained from scratch on the generated shapes dataset, on CPU, in minutes.

A half-width ResNet-18 (trainable BN, no pretrained weights exist here), a 64-channel FPN and a 4 x 64 T-Head,
320 px images, batch 8. ``train.max_iter`` is the one knob of the time budget: the learning-rate steps, the
ATSS -> TAL switch and the final evaluation follow it (tools/quickstart.py --max-iter N).

Two choices differ from the COCO recipe, both measured here for 700 iterations from scratch (box AP on
tood_shapes_val): SGD lr 0.02 gave 4.3 AP; the alignment map M starting at sigmoid(M) = 0.5 instead of 0.01
gave 5.9; AdamW (lr 1e-3, weight decay 0.05) on top gave 22.7. With SGD the class logits saturate at every object
location while sigmoid(M) stays small, so P = sqrt(sigmoid(logits) * sigmoid(M)) is small for every class and the
loss that separates the classes (weighted by P^2) barely acts.
"""

# ruff: noqa: F401  (a LazyConfig file exports the names it imports)

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from tood.compat import RETINANET_HEAD_GN

from .common.data.coco import dataloader
from .common.models.tood import model
from .common.optim import AdamW as optimizer
from .common.train import train

# BatchNorm over the whole batch, also when it is split across processes (plain BN in one process).
NORM = "naiveSyncBN"
WIDTHS = [32, 64, 128, 256]  # res2..res5, half of ResNet-18's
FPN_CHANNELS = 64
IMAGE_SIZE = 320

model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=WIDTHS[0], norm=NORM),
    stages=[
        L(ResNet.make_stage)(
            block_class=BasicBlock,
            num_blocks=2,
            in_channels=WIDTHS[max(i - 1, 0)],
            out_channels=WIDTHS[i],
            stride_per_block=[1 if i == 0 else 2, 1],
            norm=NORM,
        )
        for i in range(4)
    ],
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.out_channels = FPN_CHANNELS
model.backbone.top_block.in_channels = FPN_CHANNELS
model.backbone.top_block.out_channels = FPN_CHANNELS
model.head.input_shape = [ShapeSpec(channels=FPN_CHANNELS)] * 5
model.head.feat_channels = 64
model.head.stacked_convs = 4
model.head.alignment_prior_prob = 0.5
model.num_classes = 6


def baseline_head(head_class, **kwargs):
    """Detectron2's dense ``head_class`` (RetinaNetHead, FCOSHead) at the T-Head's widths above, with GroupNorm: the
    head of the accuracy study's baselines (configs/quickstart_shapes_fcos.py, quickstart_shapes_retinanet.py)."""
    return L(head_class)(
        input_shape=[ShapeSpec(channels=FPN_CHANNELS)] * 5,
        num_classes="${..num_classes}",
        conv_dims=[model.head.feat_channels] * model.head.stacked_convs,
        norm=RETINANET_HEAD_GN,
        prior_prob=0.01,
        **kwargs,
    )


dataloader.train.dataset.names = "tood_shapes_train"
dataloader.test.dataset.names = "tood_shapes_val"
dataloader.train.mapper.augmentations[0].short_edge_length = IMAGE_SIZE
dataloader.train.mapper.augmentations[0].max_size = IMAGE_SIZE
dataloader.test.mapper.augmentations[0].short_edge_length = IMAGE_SIZE
dataloader.test.mapper.augmentations[0].max_size = IMAGE_SIZE
dataloader.train.total_batch_size = 8
# Loading 320 px images costs little next to a CPU training step; worker processes would compete for the cores.
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0


train.max_iter = 1300
# Chosen by the CPU: bfloat16 autocast where it has bfloat16 units (AVX512-BF16, AMX), about twice as fast at the
# same AP; float32 elsewhere, where bfloat16 is emulated and slower (tood.precision.choose_precision).
train.amp.enabled = None
train.init_checkpoint = ""
# A fixed seed (Detectron2's default draws one per run), so that the quick start's AP can be
# compared with docs/benchmarks.md's.
train.seed = 0
train.eval_period = 0  # evaluate once, at the end
train.checkpointer.period = 300
train.log_period = 20
# Milestones in percent of the run: x0.1 at 75% and 90%; warm-up over the first 5%.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[75, 90], num_updates=100),
    warmup_length=0.05,
    warmup_method="linear",
    warmup_factor=0.001,
)
