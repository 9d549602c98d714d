"""TOOD's task-aligned head (T-Head), section 3.1 of the paper (Feng et al., ICCV 2021).

Computes what mmdetection 3.3's ``TOODHead.forward`` computes; parameter names differ and are mapped in
:mod:`tood.mmdet_names`.
"""

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn

from .layers import ModulatedDeformConv2d, Scale, align_boxes, at_least_float32, sigmoid_geometric_mean
from .priors import level_boxes, level_points

__all__ = ["TOODHead", "TaskDecomposition", "decode_delta_xywh"]

# mmdet's DeltaXYWHBBoxCoder as configured for TOOD: means 0, stds (.1, .1, .2, .2), log-size deltas clamped to
# +-|log(16 / 1000)| on both sides. detectron2's Box2BoxTransform((10, 10, 5, 5), log(1000 / 16)) clamps only from
# above, so it decodes strongly shrinking deltas differently and is not used.
DELTA_XYWH_STDS = (0.1, 0.1, 0.2, 0.2)
MAX_LOG_SIZE_RATIO = abs(math.log(16 / 1000))
MAX_LOG_DISTANCE = math.log(1e6)


def decode_delta_xywh(deltas: Tensor, anchors: Tensor) -> Tensor:
    """Apply normalised (dx, dy, dw, dh) deltas to anchors.

    Args:
        deltas: (N, 4, H, W), divided by ``DELTA_XYWH_STDS`` as mmdet's coder encodes them.
        anchors: (4, H, W) xyxy.

    Returns:
        (N, 4, H, W) xyxy boxes, in the anchors' units.
    """
    stds = deltas.new_tensor(DELTA_XYWH_STDS).view(1, 4, 1, 1)
    deltas = deltas * stds
    centers = (anchors[:2] + anchors[2:]) * 0.5
    sizes = anchors[2:] - anchors[:2]
    new_centers = centers + sizes * deltas[:, :2]
    new_sizes = sizes * deltas[:, 2:].clamp(min=-MAX_LOG_SIZE_RATIO, max=MAX_LOG_SIZE_RATIO).exp()
    return torch.cat([new_centers - new_sizes * 0.5, new_centers + new_sizes * 0.5], dim=1)


def _normal_init(conv: nn.Module, std: float, bias: float = 0.0) -> None:
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)


def _alignment_branch(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """conv1x1 -> ReLU -> conv3x3, the shape of the alignment-map (M) and offset (O) branches."""
    return nn.Sequential(
        OrderedDict(
            reduce=nn.Conv2d(in_channels, mid_channels, 1),
            relu=nn.ReLU(inplace=True),
            predict=nn.Conv2d(mid_channels, out_channels, 3, padding=1),
        )
    )


class TaskDecomposition(nn.Module):
    """Task-specific features from the stacked interactive features (one instance per task).

    Layer attention ``w = sigmoid(fc2(relu(fc1(avgpool(X_inter)))))`` weights each of the ``L`` stacked feature
    blocks; ``Y = relu(norm(W_red . concat(w_k X_k)))`` with a 1x1 reduction ``W_red``.
    """

    def __init__(self, feat_channels: int, stacked_convs: int, la_down_rate: int, norm: Union[str, Callable]):
        super().__init__()
        in_channels = feat_channels * stacked_convs
        self.stacked_convs = stacked_convs
        self.layer_attention = nn.Sequential(
            OrderedDict(
                fc1=nn.Conv2d(in_channels, in_channels // la_down_rate, 1),
                relu=nn.ReLU(inplace=True),
                fc2=nn.Conv2d(in_channels // la_down_rate, stacked_convs, 1),
                sigmoid=nn.Sigmoid(),
            )
        )
        self.reduction = Conv2d(
            in_channels,
            feat_channels,
            1,
            bias=not norm,
            norm=get_norm(norm, feat_channels),
            activation=F.relu,
        )

    def forward(self, feat: Tensor, avg_feat: Tensor) -> Tensor:
        """
        Args:
            feat: X_inter, (N, L * C, H, W).
            avg_feat: its global average, (N, L * C, 1, 1).

        Returns:
            (N, C, H, W).
        """
        n, _, h, w = feat.shape
        attention = self.layer_attention(avg_feat).reshape(n, 1, self.stacked_convs, 1)
        weight = self.reduction.weight
        c_out = weight.shape[0]
        # Scale the reduction weight's L column blocks per image (N x C x L*C numbers) rather than the L feature
        # blocks (N x L*C x H x W): the same product, cheaper, and the reference's order of operations.
        weight = (attention * weight.reshape(1, c_out, self.stacked_convs, -1)).reshape(n, c_out, -1)
        out = torch.bmm(weight, feat.reshape(n, weight.shape[2], h * w)).reshape(n, c_out, h, w)
        if self.reduction.bias is not None:
            out = out + self.reduction.bias.view(1, -1, 1, 1)
        if self.reduction.norm is not None:
            out = self.reduction.norm(out)
        return self.reduction.activation(out)


class TOODHead(nn.Module):
    """The T-Head of :paper:`TOOD`: task-interactive features, task decomposition and task alignment.

    Weights are shared across levels except a scalar :class:`Scale` per level on the box regression.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        feat_channels: int = 256,
        stacked_convs: int = 6,
        norm: Union[str, Callable[[int], nn.Module]] = "GN",
        prior_prob: float = 0.01,
        alignment_prior_prob: Optional[float] = None,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        anchor_type: str = "anchor_free",
        octave_base_scale: float = 8,
        num_dcn: int = 0,
        dcn_deform_groups: int = 4,
    ):
        """
        Args:
            input_shape: one ShapeSpec per input level, all with the same number of channels.
            num_classes: K, number of foreground classes.
            feat_channels: channels of the interactive and task features.
            stacked_convs: number of task-interactive convs (L).
            norm: normalisation after the interactive and reduction convs, see :func:`detectron2.layers.get_norm`
                ("GN" is GroupNorm with 32 groups); convs get a bias only when it is empty.
            prior_prob: initial foreground probability of the classifier, and of the alignment map unless
                ``alignment_prior_prob`` is given.
            alignment_prior_prob: initial sigmoid of the alignment map M (default: ``prior_prob``, the reference).
                With P = sqrt(sigmoid(logits) * sigmoid(M)), a small sigmoid(M) keeps every P small, and with it the
                loss that separates the classes at object locations; a higher start helps short from-scratch runs.
            strides: stride of each input level.
            anchor_type: "anchor_free" (boxes from exp distances to the location) or "anchor_based" (delta-xywh on
                the square prior of side ``octave_base_scale * stride``).
            octave_base_scale: prior box side in strides.
            num_dcn: how many of the first interactive convs are modulated deformable convs (DCNv2).
            dcn_deform_groups: deform groups of those convs.
        """
        super().__init__()
        if anchor_type not in ("anchor_free", "anchor_based"):
            raise ValueError(f"anchor_type must be 'anchor_free' or 'anchor_based', got {anchor_type!r}")
        if len(strides) != len(input_shape):
            raise ValueError(f"{len(input_shape)} input levels but {len(strides)} strides")
        in_channels = {s.channels for s in input_shape}
        if len(in_channels) != 1:
            raise ValueError(f"all input levels must have the same channels, got {sorted(in_channels)}")
        in_channels = in_channels.pop()

        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.anchor_type = anchor_type
        self.octave_base_scale = octave_base_scale

        self.inter_convs = nn.ModuleList()
        for i in range(stacked_convs):
            conv_cls = ModulatedDeformConv2d if i < num_dcn else Conv2d
            extra = {"deform_groups": dcn_deform_groups} if i < num_dcn else {}
            self.inter_convs.append(
                conv_cls(
                    in_channels if i == 0 else feat_channels,
                    feat_channels,
                    3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, feat_channels),
                    activation=F.relu,
                    **extra,
                )
            )
        inter_channels = feat_channels * stacked_convs
        self.cls_decomp = TaskDecomposition(feat_channels, stacked_convs, stacked_convs * 8, norm)
        self.reg_decomp = TaskDecomposition(feat_channels, stacked_convs, stacked_convs * 8, norm)
        self.cls_score = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.alignment_map = _alignment_branch(inter_channels, feat_channels // 4, 1)
        self.offset_map = _alignment_branch(inter_channels, feat_channels // 4, 8)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        # Prior points per (H, W, stride, device, dtype); a plain dict so it stays out of the state dict.
        self._prior_cache: Dict[tuple, Tensor] = {}
        self._init_weights(prior_prob, prior_prob if alignment_prior_prob is None else alignment_prior_prob)

    def _init_weights(self, prior_prob: float, alignment_prior_prob: float) -> None:
        prior_bias = -math.log((1 - prior_prob) / prior_prob)
        alignment_bias = -math.log((1 - alignment_prior_prob) / alignment_prior_prob)
        for conv in self.inter_convs:
            _normal_init(conv, std=0.01)
        for decomp in (self.cls_decomp, self.reg_decomp):
            _normal_init(decomp.layer_attention.fc1, std=0.001)
            _normal_init(decomp.layer_attention.fc2, std=0.001)
            _normal_init(decomp.reduction, std=0.01)
        _normal_init(self.alignment_map.reduce, std=0.01)
        _normal_init(self.alignment_map.predict, std=0.01, bias=alignment_bias)
        _normal_init(self.offset_map.reduce, std=0.001)
        _normal_init(self.offset_map.predict, std=0.001)
        _normal_init(self.cls_score, std=0.01, bias=prior_bias)
        _normal_init(self.bbox_pred, std=0.01)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        """Arguments from ``cfg.MODEL.TOOD`` (see :func:`tood.config.add_tood_config`); absent keys keep the
        constructor's defaults. The strides are those of ``input_shape``."""
        keys = {
            "NUM_CLASSES": "num_classes",
            "FEAT_CHANNELS": "feat_channels",
            "NUM_CONVS": "stacked_convs",
            "NORM": "norm",
            "PRIOR_PROB": "prior_prob",
            "ALIGNMENT_PRIOR_PROB": "alignment_prior_prob",
            "ANCHOR_TYPE": "anchor_type",
            "OCTAVE_BASE_SCALE": "octave_base_scale",
            "NUM_DCN": "num_dcn",
            "DCN_DEFORM_GROUPS": "dcn_deform_groups",
        }
        node = cfg.MODEL.TOOD
        ret = {arg: node[key] for key, arg in keys.items() if key in node}
        ret.update(input_shape=input_shape, strides=[s.stride for s in input_shape])
        return ret

    def prior_points(
        self, sizes: Sequence[Tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> List[Tensor]:
        """Prior points of every level, cached.

        Args:
            sizes: (Hi, Wi) of each level, in the order of ``strides``.

        Returns:
            per level (Hi * Wi, 2) pixel (x, y) = (x * stride, y * stride), row-major over (y, x). Shared with the
            cache: do not modify in place.
        """
        return [self._level_points(size, s, torch.device(device), dtype) for size, s in zip(sizes, self.strides)]

    def prior_boxes(
        self, sizes: Sequence[Tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> List[Tensor]:
        """Per level (Hi * Wi, 4) xyxy pixel squares of side ``octave_base_scale * stride`` around the points."""
        points = self.prior_points(sizes, device, dtype)
        return [level_boxes(p, s, self.octave_base_scale) for p, s in zip(points, self.strides)]

    def _level_points(self, size, stride: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if torch.compiler.is_compiling():
            # A cache key of int() sizes would freeze the example's sizes into the exported graph.
            return level_points(size, stride, device, dtype)
        key = (int(size[0]), int(size[1]), stride, device, dtype)
        points = self._prior_cache.get(key)
        if points is None:
            points = self._prior_cache[key] = level_points(key[:2], stride, device, dtype)
        return points

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Args:
            features: per level (N, C_in, Hi, Wi), in the order of ``strides``.

        Returns:
            cls_scores: per level (N, K, Hi, Wi), the aligned probabilities P = sqrt(sigmoid(logits) * sigmoid(M)),
                already probabilities.
            bbox_preds: per level (N, 4, Hi, Wi), aligned boxes xyxy in units of the level's stride (multiply by
                the stride for pixels); where the aligned box is invalid (x1 > x2 or y1 > y2) the unaligned one.
            Both are float32 under autocast (boxes of up to ~100 strides need sub-pixel precision, beyond the 8
            (bfloat16) or 11 (float16) significant bits, and the losses on P are computed in float32); float64 in a
            float64 model.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(features)}")
        cls_scores, bbox_preds = [], []
        for x, stride, scale in zip(features, self.strides, self.scales):
            inter_feats = []
            for conv in self.inter_convs:
                x = conv(x)
                inter_feats.append(x)
            feat = torch.cat(inter_feats, dim=1)
            avg_feat = F.adaptive_avg_pool2d(feat, 1)
            cls_feat = self.cls_decomp(feat, avg_feat)
            reg_feat = self.reg_decomp(feat, avg_feat)

            cls_scores.append(
                sigmoid_geometric_mean(
                    at_least_float32(self.cls_score(cls_feat)), at_least_float32(self.alignment_map(feat))
                )
            )

            boxes = self._decode_boxes(at_least_float32(self.bbox_pred(reg_feat)), scale, stride)
            aligned = align_boxes(boxes, at_least_float32(self.offset_map(feat)))
            # As mmdet 3.x: where the sampled corners crossed, keep the unaligned box (a crossed box makes GIoU < 0).
            invalid = (aligned[:, 0:1] > aligned[:, 2:3]) | (aligned[:, 1:2] > aligned[:, 3:4])
            bbox_preds.append(torch.where(invalid, boxes, aligned))
        return cls_scores, bbox_preds

    def _decode_boxes(self, reg: Tensor, scale: Scale, stride: int) -> Tensor:
        """Regression output (N, 4, H, W) -> unaligned boxes (N, 4, H, W), xyxy in stride units."""
        h, w = reg.shape[-2:]
        points = self._level_points((h, w), stride, reg.device, reg.dtype)
        if self.anchor_type == "anchor_free":
            # Centres divided by the stride are the integer grid (centre offset 0).
            centers = (points / stride).t().reshape(2, h, w)
            # (l, t, r, b); the clamp (a million strides) only keeps a diverging run's boxes finite.
            distances = scale(reg.clamp(max=MAX_LOG_DISTANCE).exp())
            return torch.cat([centers - distances[:, :2], centers + distances[:, 2:]], dim=1)
        anchors = level_boxes(points, stride, self.octave_base_scale).t().reshape(4, h, w)
        return decode_delta_xywh(scale(reg), anchors) / stride
