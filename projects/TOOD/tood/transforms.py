"""mmdetection's image resize as a Detectron2 augmentation, for pixel-exact inputs to converted models.

Detectron2's ``ResizeShortestEdge`` resizes uint8 images with PIL's bilinear filter; mmdetection (``Resize`` with
``keep_ratio=True``) uses OpenCV's ``INTER_LINEAR``. Both interpolate bilinearly between the same pixel centres but
round differently: on scikit-image's astronaut photo (512x512 -> 800x800) 19% of the resized values differ, each by
one intensity level. :class:`ResizeKeepRatioCV2` reproduces mmdetection's resized image bit for bit; TOOD's COCO
data configs (``configs/common/data/coco.py``) and its YAML configs (:func:`with_reference_resize`) resize with it.
"""

from typing import List, Tuple, Union

import cv2
import numpy as np
from detectron2.data.transforms import Augmentation, ResizeShortestEdge, Transform

__all__ = ["CV2ResizeTransform", "ResizeKeepRatioCV2", "with_reference_resize", "keep_ratio_size"]


def keep_ratio_size(h: int, w: int, short_edge: int, max_size: int) -> Tuple[int, int]:
    """mmcv's ``rescale_size``: the largest (h, w) with the image's aspect ratio within short_edge x max_size.

    The factor is ``min(max_size / long side, short_edge / short side)`` and each side is rounded half up, in
    mmcv's order of float operations (Detectron2's ``ResizeShortestEdge`` computes the same size in two steps and
    can round a side differently when it lands on .5).
    """
    scale = min(max_size / max(h, w), short_edge / min(h, w))
    return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)


class CV2ResizeTransform(Transform):
    """Resize an (H, W, C) or (H, W) image to (new_h, new_w) with OpenCV; coordinates scale by new / old size."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        # OpenCV drops a trailing channel axis of size 1 (grayscale "L" images).
        return out.reshape(self.new_h, self.new_w, *img.shape[2:])

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """coords: (N, 2) x, y."""
        coords[:, 0] = coords[:, 0] * (self.new_w * 1.0 / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h * 1.0 / self.h)
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return cv2.resize(segmentation, (self.new_w, self.new_h), interpolation=cv2.INTER_NEAREST)

    def inverse(self) -> Transform:
        return CV2ResizeTransform(self.new_h, self.new_w, self.h, self.w)


class ResizeKeepRatioCV2(Augmentation):
    """mmdetection's ``Resize(scale=(max_size, short_edge), keep_ratio=True)`` (and ``RandomResize`` for ranges).

    Same arguments as Detectron2's ``ResizeShortestEdge``: the short side becomes ``short_edge_length`` unless the
    long side would exceed ``max_size``. Sizes follow :func:`keep_ratio_size`, pixels OpenCV's bilinear resize.
    """

    def __init__(
        self,
        short_edge_length: Union[int, Tuple[int, ...]],
        max_size: int = 1333,
        sample_style: str = "range",
    ):
        """
        Args:
            short_edge_length: a size, or with ``sample_style="range"`` (min, max) to draw an integer from
                uniformly (both included), or with "choice" sizes to pick from.
            max_size: bound of the long side.
            sample_style: "range" or "choice".
        """
        super().__init__()
        if sample_style not in ("range", "choice"):
            raise ValueError(f"sample_style must be 'range' or 'choice', got {sample_style!r}")
        if isinstance(short_edge_length, int):
            short_edge_length = (short_edge_length, short_edge_length)
        if sample_style == "range" and len(short_edge_length) != 2:
            raise ValueError(f"short_edge_length must be (min, max) with sample_style='range', got {short_edge_length}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> CV2ResizeTransform:
        h, w = image.shape[:2]
        if self.sample_style == "range":
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        return CV2ResizeTransform(h, w, *keep_ratio_size(h, w, int(size), self.max_size))


def with_reference_resize(augmentations: List[Augmentation]) -> List[Augmentation]:
    """``augmentations`` with each ``ResizeShortestEdge`` replaced by the :class:`ResizeKeepRatioCV2` of the same
    sizes: a mapper built from a YAML config (``DatasetMapper.from_config``) then resizes as the LazyConfig data
    configs do."""
    return [
        ResizeKeepRatioCV2(aug.short_edge_length, aug.max_size, "range" if aug.is_range else "choice")
        if isinstance(aug, ResizeShortestEdge)
        else aug
        for aug in augmentations
    ]
