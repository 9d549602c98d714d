"""ResNet / ResNeXt stages with modulated deformable convolution (DCNv2) that run on CPU and GPU.

Detectron2's ``DeformBottleneckBlock`` calls its compiled ``ModulatedDeformConv``, which refuses CPU
inputs and is absent from builds without compiled ops. The block here has the same structure and
parameter names (``conv2_offset``, ``conv2.weight``, ``conv2.norm``), so checkpoints of Detectron2's DCN
backbones load into it unchanged, and computes the convolution with :class:`tood.layers.ModulatedDeformConv2d`
(CPU and GPU).
"""

from typing import Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, get_norm
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from torch import nn

from .layers import ModulatedDeformConv2d


class DeformBottleneckBlock(CNNBlockBase):
    """A bottleneck block whose 3x3 conv is a DCNv2 (mmdetection's ``dcn=dict(type="DCNv2")`` in a stage).

    Arguments are those of Detectron2's ``BottleneckBlock`` plus ``deform_num_groups``. The offset/mask
    conv starts at zero, so an ImageNet-initialised block first behaves as the plain bottleneck.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm="BN",
        stride_in_1x1=False,
        dilation=1,
        deform_num_groups=1,
    ):
        super().__init__(in_channels, out_channels, stride)
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False, norm=get_norm(norm, out_channels)
            )
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            kernel_size=1,
            stride=stride_1x1,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )
        # 3 * 9 channels per deformable group: y/x offsets and the modulation mask of each kernel point.
        self.conv2_offset = Conv2d(
            bottleneck_channels,
            27 * deform_num_groups,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
        )
        self.conv2 = ModulatedDeformConv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            groups=num_groups,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
            offset_conv=False,
        )
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, kernel_size=1, bias=False, norm=get_norm(norm, out_channels)
        )
        for layer in [self.conv1, self.conv2, self.conv3, self.shortcut]:
            if layer is not None:
                weight_init.c2_msra_fill(layer)
        nn.init.constant_(self.conv2_offset.weight, 0)
        nn.init.constant_(self.conv2_offset.bias, 0)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        # Same split as mmcv's ModulatedDeformConv2dPack and Detectron2: two thirds offsets, one third mask.
        offset_a, offset_b, mask = torch.chunk(self.conv2_offset(out), 3, dim=1)
        out = F.relu_(self.conv2(out, torch.cat((offset_a, offset_b), dim=1), mask.sigmoid()))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


def make_resnet_stages(
    depth: int,
    *,
    num_groups: int = 1,
    width_per_group: int = 64,
    deform_on_per_stage: Sequence[bool] = (False, False, False, False),
    deform_num_groups: int = 1,
    **kwargs,
):
    """Stages res2-res5 of a bottleneck ResNet / ResNeXt, DCNv2 in the stages flagged by ``deform_on_per_stage``.

    ``ResNet.make_default_stages`` covers neither ResNeXt widths (its bottleneck is always out / 4) nor DCN in
    some stages only; this is the LazyConfig counterpart of Detectron2's ``build_resnet_backbone``.

    Args:
        depth: 50, 101 or 152.
        num_groups, width_per_group: ResNeXt cardinality and width (ResNeXt-101 64x4d: 64 and 4).
        deform_on_per_stage: for res2..res5, whether the 3x3 convs are deformable.
        deform_num_groups: deformable groups of the DCN convs.
        kwargs: passed to every block (``norm``, ``stride_in_1x1``, ...).

    Returns:
        list[list[CNNBlockBase]]: the ``stages`` argument of :class:`ResNet`.
    """
    num_blocks_per_stage = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
    in_channels, bottleneck_channels, out_channels = 64, num_groups * width_per_group, 256
    stages = []
    for idx, (num_blocks, deform) in enumerate(zip(num_blocks_per_stage, deform_on_per_stage)):
        stage_kwargs = dict(kwargs, bottleneck_channels=bottleneck_channels, num_groups=num_groups)
        if deform:
            stage_kwargs["deform_num_groups"] = deform_num_groups
        stages.append(
            ResNet.make_stage(
                block_class=DeformBottleneckBlock if deform else BottleneckBlock,
                num_blocks=num_blocks,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                **stage_kwargs,
            )
        )
        in_channels, bottleneck_channels, out_channels = out_channels, bottleneck_channels * 2, out_channels * 2
    return stages
