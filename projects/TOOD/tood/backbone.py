"""Backbone pieces TOOD needs beyond Detectron2's ResNet and FPN."""

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, ResNet, build_resnet_backbone
from detectron2.modeling.backbone.resnet import BasicStem
from torch import nn

from .backbone_dcn import make_resnet_stages

__all__ = ["FrozenStatsBatchNorm2d", "LastLevelP6P7NoReLU", "build_tood_resnet_fpn_backbone"]


class FrozenStatsBatchNorm2d(nn.Module):
    """BatchNorm whose statistics are fixed but whose affine weight and bias are trained.

    The reference's ResNet (mmdetection, ``norm_eval=True`` with ``requires_grad=True``): running statistics are
    never updated and always used, also in training, while ``weight`` and ``bias`` are parameters that the
    optimizer updates (with weight decay). Detectron2's ``FrozenBN`` fixes all four; ``BN`` updates the statistics.

    Pass the class itself as the norm of Detectron2's ResNet: ``norm=FrozenStatsBatchNorm2d``. Its state dict has
    the tensors of ``FrozenBN`` (``weight``, ``bias``, ``running_mean``, ``running_var``), so checkpoints made for
    either load into the other. ``ResNet.freeze`` sets ``requires_grad=False`` on the frozen stages' weight and bias,
    which then stay fixed as the reference's ``frozen_stages``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        # The evaluation-mode batch norm, in training too: the same arithmetic as the reference's.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replaces every ``FrozenBatchNorm2d`` in ``module`` by this class, keeping its values and trainability.

        For builders that only know Detectron2's norm names (the YAML config path): build with ``FrozenBN``,
        convert, then ``ResNet.freeze`` the frozen stages again.
        """
        if isinstance(module, FrozenBatchNorm2d):
            converted = cls(module.num_features, module.eps)
            with torch.no_grad():
                for name in ["weight", "bias", "running_mean", "running_var"]:
                    getattr(converted, name).copy_(getattr(module, name))
            return converted
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


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


def _build_deformable_resnet(cfg, input_shape: ShapeSpec, norm) -> ResNet:
    """``build_resnet_backbone`` with the DCNv2 blocks of :mod:`tood.backbone_dcn` in the stages flagged by
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` (Detectron2's own need its compiled ops and CUDA)."""
    resnets = cfg.MODEL.RESNETS
    required = {"DEFORM_MODULATED": True, "STEM_OUT_CHANNELS": 64, "RES2_OUT_CHANNELS": 256, "RES5_DILATION": 1}
    unsupported = [f"MODEL.RESNETS.{k}={resnets[k]}" for k, v in required.items() if resnets[k] != v]
    if resnets.DEPTH not in (50, 101, 152):
        unsupported.append(f"MODEL.RESNETS.DEPTH={resnets.DEPTH}")
    if unsupported:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE builds the reference's DCNv2 ResNet (modulated, depth 50/101/152, "
            f"64 stem and 256 res2 channels, no dilation); got {', '.join(unsupported)}."
        )
    stages = make_resnet_stages(
        resnets.DEPTH,
        num_groups=resnets.NUM_GROUPS,
        width_per_group=resnets.WIDTH_PER_GROUP,
        deform_on_per_stage=resnets.DEFORM_ON_PER_STAGE,
        deform_num_groups=resnets.DEFORM_NUM_GROUPS,
        stride_in_1x1=resnets.STRIDE_IN_1X1,
        norm=norm,
    )
    stem = BasicStem(input_shape.channels, resnets.STEM_OUT_CHANNELS, norm=norm)
    return ResNet(stem, stages, out_features=resnets.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_tood_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """ResNet + FPN of TOOD's YAML configs (``MODEL.BACKBONE.NAME: "build_tood_resnet_fpn_backbone"``).

    As Detectron2's ``build_retinanet_resnet_fpn_backbone`` but with :class:`LastLevelP6P7NoReLU` (P6 from P5, no
    ReLU before P7), the reference's neck. ``MODEL.RESNETS.NORM`` takes, besides Detectron2's norms,
    ``"FrozenStatsBN"``: :class:`FrozenStatsBatchNorm2d`, the reference's ResNet norm; the stages up to
    ``MODEL.BACKBONE.FREEZE_AT`` are frozen entirely. ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` gives those stages
    DCNv2 blocks that run on CPU and GPU (:class:`tood.backbone_dcn.DeformBottleneckBlock`, with
    ``DEFORM_MODULATED: True``).

    Returns:
        FPN with outputs p3-p7 (strides 8-128) when ``MODEL.FPN.IN_FEATURES`` is res3-res5.
    """
    norm = cfg.MODEL.RESNETS.NORM
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        bottom_up = _build_deformable_resnet(
            cfg, input_shape, FrozenStatsBatchNorm2d if norm == "FrozenStatsBN" else norm
        )
    elif norm == "FrozenStatsBN":
        frozen_bn_cfg = cfg.clone()
        frozen_bn_cfg.defrost()
        frozen_bn_cfg.MODEL.RESNETS.NORM = "FrozenBN"
        bottom_up = FrozenStatsBatchNorm2d.convert(build_resnet_backbone(frozen_bn_cfg, input_shape))
        # The converted norms' weight and bias are all trainable: freeze the frozen stages' again.
        bottom_up.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
    else:
        bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7NoReLU(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
