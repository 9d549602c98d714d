"""Building blocks of the T-Head: per-level scale, the aligned score, box alignment and DCNv2.

Everything here runs on CPU and GPU with stock PyTorch / torchvision ops (no compiled extension).
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

__all__ = ["Scale", "at_least_float32", "sigmoid_geometric_mean", "align_boxes", "ModulatedDeformConv2d"]


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` as float32, or unchanged if it is wider (float64).

    Boxes, scores and losses are upcast from autocast's bfloat16 / float16 (too coarse for sub-pixel boxes and for
    the losses); a model run in float64 keeps computing in float64.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Scale(nn.Module):
    """A learnable scalar multiplier; one per pyramid level on the shared regression output."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        # 0-dim, as mmcv's Scale, so checkpoints map without a reshape.
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _SigmoidGeometricMean(torch.autograd.Function):
    """sqrt(sigmoid(a) * sigmoid(b)) with the analytic gradient.

    d/da sqrt(sa * sb) = sqrt(sa * sb) * (1 - sa) / 2, which is 0 where the product underflows to 0, whereas
    autograd through sqrt gives inf * 0 = nan there.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        sa, sb = a.sigmoid(), b.sigmoid()
        out = (sa * sb).sqrt()
        ctx.save_for_backward(sa, sb, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        sa, sb, out = ctx.saved_tensors
        half = grad_out * out * 0.5
        # An input broadcast in forward (the (N, 1, H, W) alignment map) gets its gradient summed back.
        grad_a = (half * (1 - sa)).sum_to_size(sa.shape) if ctx.needs_input_grad[0] else None
        grad_b = (half * (1 - sb)).sum_to_size(sb.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def sigmoid_geometric_mean(logits: Tensor, m: Tensor) -> Tensor:
    """Aligned score ``P = sqrt(sigmoid(logits) * sigmoid(m))``.

    Args:
        logits: classification logits, e.g. (N, K, H, W).
        m: alignment-map logits broadcastable to ``logits``, e.g. (N, 1, H, W).

    Returns:
        P with the broadcast shape of the inputs, e.g. (N, K, H, W).

    Uses the analytic-gradient function only when a gradient will be taken; otherwise (inference, export) the
    plain expression, so exported graphs hold standard ops only.
    """
    if not torch.is_grad_enabled() or not (logits.requires_grad or m.requires_grad):
        return (logits.sigmoid() * m.sigmoid()).sqrt()
    return _SigmoidGeometricMean.apply(logits, m)


def align_boxes(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Sample each box channel bilinearly at its own offset position (TOOD's spatial box alignment).

    Args:
        boxes: (N, 4, H, W), any values (TOOD: xyxy in stride units).
        offsets: (N, 8, H, W); channels 2k and 2k+1 are (dy, dx) in pixels for box channel k.

    Returns:
        (N, 4, H, W): ``out[n, k, i, j] = bilinear(boxes[n, k], y=i + dy, x=j + dx)``, where pixels outside the map
        read 0. Equals ``torchvision.ops.deform_conv2d(boxes, offsets, ones(4, 1, 1, 1))``, written with
        ``grid_sample`` so that it runs under autocast and exports to ONNX.
    """
    n, c, h, w = boxes.shape
    offsets = offsets.to(boxes.dtype).reshape(n, c, 2, h, w)  # the offset conv may run in half precision
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype).view(h, 1)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype).view(1, w)
    # Pixel p of a size-S axis has normalised coordinate (2p + 1) / S - 1 under align_corners=False; unlike
    # align_corners=True (2p / (S - 1) - 1) this stays finite for S == 1.
    gx = (2 * (xs + offsets[:, :, 1]) + 1) / w - 1
    gy = (2 * (ys + offsets[:, :, 0]) + 1) / h - 1
    grid = torch.stack([gx, gy], dim=-1).reshape(n * c, h, w, 2)
    out = F.grid_sample(boxes.reshape(n * c, 1, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, c, h, w)


def deform_conv2d_by_sampling(x, offset, mask, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``torchvision.ops.deform_conv2d`` computed as bilinear sampling (``grid_sample``) then a grouped 1x1 conv.

    Same arguments, layout and result (points outside the input read 0). torchvision's CPU kernel handles a
    grouped convolution group by group and takes seconds per call for ResNeXt's 64 groups; this runs it as one
    convolution, and under bfloat16 autocast. It keeps the sampled columns (C_in * kh * kw channels) for the
    backward pass, which is why CUDA keeps torchvision's kernel.
    """
    n, c, h, w = x.shape
    out_channels, c_per_group, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    taps = kh * kw
    deform_groups = offset.shape[1] // (2 * taps)
    # Sampling positions in float32 at least: bfloat16 cannot hold sub-pixel coordinates.
    dtype = torch.promote_types(x.dtype, torch.float32)
    offset = offset.to(dtype).view(n, deform_groups, taps, 2, ho, wo)
    tap_y, tap_x = torch.meshgrid(
        torch.arange(kh, device=x.device, dtype=dtype) * dilation[0],
        torch.arange(kw, device=x.device, dtype=dtype) * dilation[1],
        indexing="ij",
    )
    rows = torch.arange(ho, device=x.device, dtype=dtype) * stride[0] - padding[0]
    cols = torch.arange(wo, device=x.device, dtype=dtype) * stride[1] - padding[1]
    ys = rows.view(1, 1, 1, ho, 1) + tap_y.reshape(1, 1, taps, 1, 1) + offset[:, :, :, 0]
    xs = cols.view(1, 1, 1, 1, wo) + tap_x.reshape(1, 1, taps, 1, 1) + offset[:, :, :, 1]
    # Pixel p of a size-S axis sits at (2p + 1) / S - 1 in grid_sample's align_corners=False coordinates.
    grid = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], dim=-1)
    sampled = F.grid_sample(
        x.to(dtype).reshape(n * deform_groups, c // deform_groups, h, w),
        grid.view(n * deform_groups, taps * ho, wo, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    sampled = sampled.view(n, deform_groups, c // deform_groups, taps, ho, wo)
    sampled = sampled * mask.to(dtype).view(n, deform_groups, 1, taps, ho, wo)
    # Channels (c, tap), c-major: group g of the 1x1 conv reads exactly the taps of its input channels.
    columns = sampled.reshape(n, c * taps, ho, wo)
    return F.conv2d(columns, weight.reshape(out_channels, c_per_group * taps, 1, 1), bias, groups=c // c_per_group)


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
) -> Tensor:
    """DCNv2: ``torchvision.ops.deform_conv2d`` with ``mask``, in float32 at least (bfloat16 cannot hold sub-pixel
    sampling positions, and torchvision has no bfloat16 CPU kernel).

    On CUDA torchvision's kernel; elsewhere :func:`deform_conv2d_by_sampling`, the same computation, much faster on
    CPU for grouped convolutions.
    """
    if x.device.type == "cuda":
        dtype = torch.promote_types(x.dtype, torch.float32)
        return deform_conv2d(
            x.to(dtype),
            offset.to(dtype),
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            stride=stride,
            padding=padding,
            dilation=dilation,
            mask=mask.to(dtype),
        )
    return deform_conv2d_by_sampling(x, offset, mask, weight, bias, stride, padding, dilation)


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2), see :func:`modulated_deform_conv2d`, then optional ``norm`` and
    ``activation`` as ``detectron2.layers.Conv2d``.

    Its parameters have mmcv's layout: ``weight`` (C_out, C_in / groups, k, k) and optional ``bias``. Offsets and
    modulation mask come either from its own ``conv_offset`` (``offset_conv=True``, mmcv's
    ``ModulatedDeformConv2dPack``: ``3 * G * k * k`` outputs, the first ``2 * G * k * k`` the offsets (per deform
    group G, (dy, dx) per kernel tap, the layout of mmcv's and torchvision's kernels), the last ``G * k * k`` the mask
    logits; zero-initialised, so it starts as a conv whose taps are halved by mask = sigmoid(0)), or from the caller
    (``offset_conv=False``: Detectron2's DCN blocks keep their offset conv beside it, as ``conv2_offset``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable[[Tensor], Tensor]] = None,
        offset_conv: bool = True,
    ):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if offset_conv:
            self.conv_offset = nn.Conv2d(
                in_channels,
                3 * deform_groups * kh * kw,
                (kh, kw),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
            )
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)
        else:
            self.conv_offset = None
        self.norm = norm
        self.activation = activation
        # mmcv's default init, uniform(+-1/sqrt(fan_in)); TOODHead and the DCN blocks re-initialise it anyway.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor, offset: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W).
            offset, mask: (N, 2 * G * k * k, H', W') and (N, G * k * k, H', W') in [0, 1]; only without
                ``conv_offset``.

        Returns:
            (N, C_out, H', W').
        """
        if self.conv_offset is not None:
            out = self.conv_offset(x)
            num_taps = out.shape[1] // 3
            offset, mask = out.split([2 * num_taps, num_taps], dim=1)
            mask = mask.sigmoid()
        x = modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
