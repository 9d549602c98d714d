"""Backbone pieces TOOD needs beyond Detectron2's ResNet and FPN."""

import fvcore.nn.weight_init as weight_init
from torch import nn


class LastLevelP6P7NoReLU(nn.Module):
    """P6 = conv3x3/2 of P5 and P7 = conv3x3/2 of P6, with no ReLU in between.

    The reference (mmdetection's FPN with ``add_extra_convs="on_output"``, ``relu_before_extra_convs=False``)
    feeds P6 straight into P7; Detectron2's ``LastLevelP6P7`` applies a ReLU there, which changes P7.
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in [self.p6, self.p7]:
            weight_init.c2_xavier_fill(module)

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(p6)]
