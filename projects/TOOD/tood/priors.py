"""Per-level priors of TOOD: one location per feature-map cell, centre offset 0 (as mmdetection).

Location (x, y) of a level with stride s sits at pixel (x * s, y * s); its prior box is the square of side
``octave_base_scale * s`` centred there. Locations are flattened row-major over (y, x), levels concatenated:
that is the anchor order of every flattened tensor of the project, ``(N, A, ...)`` with ``A = sum(Hi * Wi)``.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def level_points(size: Tuple[int, int], stride: int, device=None, dtype=torch.float32) -> Tensor:
    """Centres of one level, ``(H * W, 2)`` as (x, y) pixels."""
    h, w = size
    ys = torch.arange(h, device=device, dtype=dtype) * stride
    xs = torch.arange(w, device=device, dtype=dtype) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def level_boxes(points: Tensor, stride: int, octave_base_scale: float = 8.0) -> Tensor:
    """Square prior boxes ``(P, 4)`` xyxy around ``points (P, 2)``."""
    half = 0.5 * octave_base_scale * stride
    return torch.cat([points - half, points + half], dim=1)


def multi_level_points(
    sizes: Sequence[Tuple[int, int]], strides: Sequence[int], device=None, dtype=torch.float32
) -> List[Tensor]:
    """Centres of every level: a list of ``(Hi * Wi, 2)``."""
    return [level_points(tuple(s), st, device, dtype) for s, st in zip(sizes, strides)]
