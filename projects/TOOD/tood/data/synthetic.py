"""TOOD's default dataset: procedurally generated shapes in COCO format, made on first use and cached.

Every image is a textured background (noise, gradients, stripes, checks, smooth "clouds") with distractor
strokes and blobs that are not objects, and 0 to 40 objects of six classes (:data:`CLASSES`) drawn in random
colours and fills, sizes, aspects and rotations, overlapping each other and the image border. Labels:

* a box is the tight box of the object's whole rendered mask inside the image, computed from the mask; an
  occluded object keeps that full box;
* an object is placed only where it and every object under it keep at least ``1 - max_occlusion`` of their
  shape visible (nothing is drawn that is too hidden to label), and at least ``1 - max_truncation`` of it
  lies inside the image;
* annotations are boxes only, all ``iscrowd`` 0; ``area`` is the box area (what pycocotools gives
  detections, so COCO's small/medium/large ranges split ground truth and detections alike).

Generation is deterministic: image ``i`` depends only on ``(seed, i, image_size, config)`` through numpy's
``SeedSequence(seed).spawn``, so a dataset is a prefix of a larger one with the same seed, and the json is
byte-identical across runs. Bump :data:`VERSION` whenever the drawing changes: it names the cache folders.

Folder layout (``generate_dataset``)::

    <dir>/annotations.json      COCO instances json
    <dir>/images/000000.jpg     (or .png)

Command line: ``python -m tood.data.synthetic --out DIR --num-images N --seed S``.
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "DEFAULT_SPLITS",
    "VERSION",
    "ShapesConfig",
    "dataset_dir_name",
    "datasets_root",
    "generate_dataset",
    "get_shapes_dataset",
    "register_all",
    "register_shapes_dataset",
]

logger = logging.getLogger(__name__)

VERSION = 1
CLASSES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross")
BACKGROUNDS = ("flat", "noise", "gradient", "stripes", "checks", "clouds")
ANNOTATIONS = "annotations.json"
IMAGES = "images"
# name -> (num_images, seed) of the registered default splits, at 320 px and the default ShapesConfig.
# tood_shapes_tune: a held-out split for choosing hyper-parameters (tools/accuracy_study.py), so that
# tood_shapes_val only measures.
DEFAULT_SPLITS = {"tood_shapes_train": (2000, 0), "tood_shapes_val": (300, 1), "tood_shapes_tune": (300, 2)}


@dataclass(frozen=True)
class ShapesConfig:
    """What the generated images hold. Every field enters the cache folder's hash.

    Sizes are the longest side of an object's box in pixels, drawn log-uniformly in the range; counts are
    inclusive ranges drawn uniformly. An image is empty with ``empty_prob``, crowded (more, smaller objects)
    with ``crowded_prob``, ordinary otherwise.
    """

    classes: Tuple[str, ...] = CLASSES
    object_size: Tuple[int, int] = (16, 160)
    crowded_object_size: Tuple[int, int] = (12, 64)
    objects_per_image: Tuple[int, int] = (1, 12)
    crowded_objects_per_image: Tuple[int, int] = (20, 40)
    empty_prob: float = 0.06
    crowded_prob: float = 0.08
    # Largest hidden fraction of an object's shape, by later objects or by the image border.
    max_occlusion: float = 0.7
    max_truncation: float = 0.4
    backgrounds: Tuple[str, ...] = ("noise", "gradient", "stripes", "checks", "clouds")
    distractor_strokes: Tuple[int, int] = (0, 6)
    distractor_patches: Tuple[int, int] = (0, 3)
    # Least RGB distance (0..255 per channel) between an object's colours and the mean of what lies under it.
    min_contrast: float = 60.0
    # Image-wide: smooth illumination changing brightness by up to +-shading, Gaussian noise of std drawn in
    # [0, noise_std], blur with sigma in [0.5, 1.2] on blur_prob.
    shading: float = 0.25
    noise_std: float = 8.0
    blur_prob: float = 0.3
    image_format: str = "jpg"

    def __post_init__(self):
        unknown = set(self.classes) - set(CLASSES) or set(self.backgrounds) - set(BACKGROUNDS)
        if unknown or not self.classes or not self.backgrounds:
            raise ValueError(f"classes must be among {CLASSES} and backgrounds among {BACKGROUNDS}, got {self}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")


# --- shapes: polygons in unit coordinates, then rotated, scaled and rasterised ------------------------------

Polygons = List[Tuple[np.ndarray, int]]  # (P, 2) xy vertices, fill value: 1 draws, 0 cuts a hole


def _ellipse_points(rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _ellipse(rng: np.random.Generator, aspect: float) -> Polygons:
    return [(_ellipse_points(1.0, 1.0 / aspect), 1)]


def _rectangle(rng: np.random.Generator, aspect: float) -> Polygons:
    h = 1.0 / aspect
    return [(np.array([[-1.0, -h], [1.0, -h], [1.0, h], [-1.0, h]]), 1)]


def _triangle(rng: np.random.Generator, aspect: float) -> Polygons:
    # Vertices on an ellipse whose arcs between them are >= 50 degrees: no angle below 25 degrees (no slivers).
    min_arc = np.deg2rad(50.0)
    arcs = min_arc + (2.0 * np.pi - 3.0 * min_arc) * rng.dirichlet(np.ones(3))
    t = rng.uniform(0.0, 2.0 * np.pi) + np.cumsum(arcs)
    return [(np.stack([np.cos(t), np.sin(t) / aspect], axis=1), 1)]


def _star(rng: np.random.Generator, aspect: float) -> Polygons:
    points = int(rng.integers(5, 7))
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
    t = np.arange(2 * points) * np.pi / points
    return [(np.stack([radius * np.cos(t), radius * np.sin(t) / aspect], axis=1), 1)]


def _ring(rng: np.random.Generator, aspect: float) -> Polygons:
    inner = rng.uniform(0.45, 0.7)
    return [(_ellipse_points(1.0, 1.0 / aspect), 1), (_ellipse_points(inner, inner / aspect), 0)]


def _cross(rng: np.random.Generator, aspect: float) -> Polygons:
    w, h = rng.uniform(0.18, 0.32), 1.0 / aspect  # arm half-width, vertical arm half-length
    xy = [(-1, -w), (-w, -w), (-w, -h), (w, -h), (w, -w), (1, -w), (1, w), (w, w), (w, h), (-w, h), (-w, w), (-1, w)]
    return [(np.array(xy, dtype=np.float64), 1)]


# class -> (unit polygons, largest aspect ratio of its unrotated extent)
_SHAPES: Dict[str, Tuple[Callable[[np.random.Generator, float], Polygons], float]] = {
    "ellipse": (_ellipse, 2.5),
    "rectangle": (_rectangle, 3.0),
    "triangle": (_triangle, 1.5),
    "star": (_star, 1.3),
    "ring": (_ring, 1.6),
    "cross": (_cross, 1.6),
}


def _mask_slices(mask: np.ndarray) -> Tuple[slice, slice]:
    """Rows and columns ``(ys, xs)`` of the tight box of a non-empty 2D mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _render_shape(kind: str, longest: float, rng: np.random.Generator) -> np.ndarray:
    """Binary mask ``(h, w)`` uint8 of one randomly rotated shape, cropped to its drawn pixels.

    ``max(h, w)`` is ``longest`` within a pixel; the short side of the unrotated shape stays >= 6 px.
    """
    make, max_aspect = _SHAPES[kind]
    polygons = make(rng, min(rng.uniform(1.0, max_aspect), max(longest / 6.0, 1.0)))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polygons = [(p @ rotation.T, v) for p, v in polygons]
    corners = np.concatenate([p for p, _ in polygons])
    lo = corners.min(axis=0)
    scale = (longest - 1.0) / (corners.max(axis=0) - lo).max()
    w, h = np.ceil((corners.max(axis=0) - lo) * scale).astype(int) + 2
    mask = np.zeros((h, w), np.uint8)
    for p, value in polygons:
        # 4 fractional bits: sub-pixel vertices, so small shapes keep their form.
        vertices = np.round(((p - lo) * scale + 0.5) * 16).astype(np.int32)
        cv2.fillPoly(mask, [vertices], value, lineType=cv2.LINE_8, shift=4)
    return mask[_mask_slices(mask)]


# --- appearance --------------------------------------------------------------------------------------------


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray, min_contrast: float) -> np.ndarray:
    """An RGB colour ``(3,)`` at least ``min_contrast`` from ``reference``: the first of 16 draws that is, else
    the farthest (a fixed number of draws keeps the random stream independent of the content)."""
    candidates = rng.uniform(0.0, 255.0, (16, 3))
    distance = np.linalg.norm(candidates - reference, axis=1)
    good = np.flatnonzero(distance >= min_contrast)
    return candidates[good[0] if good.size else distance.argmax()]


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Coordinate ``(h, w)`` along a random direction, in pixels from the first corner."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))
    return u - u.min()


def _two_tone(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Blend ``(h, w, 3)`` float32 of two colours by weight ``t (h, w)`` float32 in [0, 1]."""
    c1, c2 = c1.astype(np.float32), c2.astype(np.float32)
    return c1 + t[..., None] * (c2 - c1)


def _noise(rng: np.random.Generator, std: float, shape: Tuple[int, ...]) -> np.ndarray:
    """Zero-mean Gaussian noise, float32 (drawn in float32: full images of it are the costliest draws)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _fill(rng: np.random.Generator, h: int, w: int, reference: np.ndarray, min_contrast: float) -> np.ndarray:
    """Texture ``(h, w, 3)`` float32 of an object or blob: solid, gradient, stripes or noisy colour."""
    c1 = _contrasting_colour(rng, reference, min_contrast)
    c2 = _contrasting_colour(rng, reference, min_contrast)
    kind = rng.choice(4, p=[0.45, 0.2, 0.15, 0.2])
    if kind == 0:
        return np.broadcast_to(c1.astype(np.float32), (h, w, 3))
    if kind == 1:
        u = _ramp(rng, h, w)
        return _two_tone(u / max(float(u.max()), 1.0), c1, c2)
    if kind == 2:
        period = rng.uniform(3.0, max(4.0, min(h, w) / 2.0))
        return _two_tone((np.sin(_ramp(rng, h, w) * (2.0 * np.pi / period)) > 0).astype(np.float32), c1, c2)
    return c1.astype(np.float32) + _noise(rng, rng.uniform(8.0, 25.0), (h, w, 3))


def _background(rng: np.random.Generator, size: int, kinds: Tuple[str, ...]) -> np.ndarray:
    """Textured background ``(size, size, 3)`` float32 in about [0, 255]."""
    c1 = rng.uniform(0.0, 255.0, 3)
    c2 = np.clip(c1 + rng.uniform(-1.0, 1.0, 3) * rng.uniform(30.0, 140.0), 0.0, 255.0)
    kind = kinds[rng.integers(len(kinds))]
    if kind == "flat":
        image = np.broadcast_to(c1.astype(np.float32), (size, size, 3)).copy()
    elif kind == "noise":
        channels = 3 if rng.random() < 0.5 else 1
        image = c1.astype(np.float32) + _noise(rng, rng.uniform(5.0, 30.0), (size, size, channels))
    elif kind == "gradient":
        u = _ramp(rng, size, size)
        image = _two_tone(u / u.max(), c1, c2)
    elif kind == "stripes":
        wave = np.sin(_ramp(rng, size, size) * (2.0 * np.pi / rng.uniform(6.0, 48.0)) + rng.uniform(0, 2 * np.pi))
        image = _two_tone((wave > 0).astype(np.float32) if rng.random() < 0.5 else 0.5 + 0.5 * wave, c1, c2)
    elif kind == "checks":
        cell, angle = rng.uniform(8.0, 48.0), rng.uniform(0.0, np.pi / 2)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        u = (xx * np.cos(angle) + yy * np.sin(angle)) / cell
        v = (yy * np.cos(angle) - xx * np.sin(angle)) / cell
        image = _two_tone(((np.floor(u) + np.floor(v)) % 2).astype(np.float32), c1, c2)
    else:  # clouds: smooth colour blotches
        grid = rng.integers(3, 11)
        coarse = (c1 + rng.uniform(-60.0, 60.0, (grid, grid, 3))).astype(np.float32)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    if kind not in ("flat", "noise") and rng.random() < 0.5:
        image = image + _noise(rng, rng.uniform(3.0, 12.0), (size, size, 1))
    return image


def _blob_points(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """Vertices ``(64, 2)`` of a smooth irregular blob: a circle with random low-frequency radial bumps."""
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4):
        r += rng.uniform(0.1, 0.3) * np.cos(k * t + rng.uniform(0.0, 2.0 * np.pi))
    return center + radius * np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


# --- one image ---------------------------------------------------------------------------------------------


class _Canvas:
    """An image being drawn, with the index of the object that shows at every pixel (0: none).

    ``visible[k]`` counts the shown pixels of object ``k``, ``full[k]`` the pixels of its whole shape (also
    those outside the image); drawing something over object ``k`` is allowed only while
    ``visible[k] >= keep * full[k]``.
    """

    def __init__(self, image: np.ndarray, keep: float, capacity: int):
        self.image = image
        self.owner = np.zeros(image.shape[:2], np.int32)
        self.keep = keep
        self.visible = np.zeros(capacity + 1, np.int64)
        self.full = np.zeros(capacity + 1, np.int64)
        self.count = 0

    def hides_too_much(self, ys: slice, xs: slice, mask: np.ndarray) -> bool:
        """Whether drawing ``mask`` (bool, same shape as the region ``ys, xs``) would bury some object."""
        n = self.count
        lost = np.bincount(self.owner[ys, xs][mask], minlength=n + 1)[1:]
        return bool(np.any(self.visible[1 : n + 1] - lost < self.keep * self.full[1 : n + 1]))

    def paint(self, ys: slice, xs: slice, mask: np.ndarray, texture: np.ndarray, owner: int) -> None:
        """Draws ``texture`` (region-shaped ``(h, w, 3)``) where ``mask`` is set, owned by ``owner``."""
        lost = np.bincount(self.owner[ys, xs][mask], minlength=self.count + 1)
        self.visible[: lost.size] -= lost
        self.image[ys, xs][mask] = texture[mask]
        self.owner[ys, xs][mask] = owner
        self.visible[owner] += int(mask.sum())

    def mean_under(self, ys: slice, xs: slice, mask: np.ndarray) -> np.ndarray:
        return self.image[ys, xs][mask].mean(axis=0)


def _draw_distractor(rng: np.random.Generator, canvas: _Canvas, stroke: bool, config: ShapesConfig) -> None:
    """A stroke (polyline or arc) or a blob that is not an object, unless it would bury an object."""
    size = canvas.image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    if stroke:
        start = rng.uniform(0, size, 2)
        if rng.random() < 0.6:
            points = start + np.cumsum(rng.normal(0.0, size / 8.0, (int(rng.integers(2, 6)), 2)), axis=0)
            cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 1, int(rng.integers(1, 5)))
        else:
            axes = tuple(int(a) for a in rng.uniform(10, size / 3, 2))
            begin = rng.uniform(0, 360)
            arc = (tuple(int(c) for c in start), axes, rng.uniform(0, 180), begin, begin + rng.uniform(40, 200))
            cv2.ellipse(mask, *arc, 1, int(rng.integers(1, 4)))
    else:
        points = _blob_points(rng, rng.uniform(0, size, 2), rng.uniform(6.0, 40.0))
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, shift=4)
    if not mask.any():
        return
    ys, xs = _mask_slices(mask)
    mask = mask[ys, xs].astype(bool)
    if canvas.hides_too_much(ys, xs, mask):
        return
    reference = canvas.mean_under(ys, xs, mask)
    if stroke:
        colour = _contrasting_colour(rng, reference, 0.5 * config.min_contrast)
        texture = np.broadcast_to(colour.astype(np.float32), mask.shape + (3,))
    else:
        texture = _fill(rng, mask.shape[0], mask.shape[1], reference, 0.5 * config.min_contrast)
    canvas.paint(ys, xs, mask, texture, 0)


def _place_object(
    rng: np.random.Generator, canvas: _Canvas, kind: str, longest: float, config: ShapesConfig
) -> Optional[List[int]]:
    """Draws one object where it buries nothing and shows enough of itself; returns its xywh box or None."""
    size = canvas.image.shape[0]
    shape = _render_shape(kind, longest, rng)
    h, w = shape.shape
    full_area = int(shape.sum())
    for _ in range(10):
        # Top-left corner; up to max_truncation of the extent may leave the image on each side.
        x0 = int(np.floor(rng.uniform(-config.max_truncation * w, size - (1.0 - config.max_truncation) * w)))
        y0 = int(np.floor(rng.uniform(-config.max_truncation * h, size - (1.0 - config.max_truncation) * h)))
        xs, ys = slice(max(x0, 0), min(x0 + w, size)), slice(max(y0, 0), min(y0 + h, size))
        mask = shape[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0].astype(bool)
        if mask.sum() < (1.0 - config.max_truncation) * full_area or canvas.hides_too_much(ys, xs, mask):
            continue
        reference = canvas.mean_under(ys, xs, mask)
        texture = _fill(rng, mask.shape[0], mask.shape[1], reference, config.min_contrast)
        if rng.random() < 0.3:  # an outline inside the shape, so the box stays that of the shape
            inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 3)))
            texture = np.array(texture)
            texture[mask & ~inner.astype(bool)] = _contrasting_colour(rng, reference, config.min_contrast)
        canvas.count += 1
        canvas.full[canvas.count] = full_area
        canvas.paint(ys, xs, mask, texture, canvas.count)
        box_ys, box_xs = _mask_slices(mask)
        return [
            xs.start + box_xs.start,
            ys.start + box_ys.start,
            box_xs.stop - box_xs.start,
            box_ys.stop - box_ys.start,
        ]
    return None


def _draw_image(rng: np.random.Generator, image_size: int, config: ShapesConfig):
    """One image ``(S, S, 3)`` uint8 RGB and its objects as ``[(class index, [x, y, w, h])]``."""
    u = rng.random()
    if u < config.empty_prob:
        count, sizes = 0, config.object_size
    elif u < config.empty_prob + config.crowded_prob:
        count, sizes = int(rng.integers(*config.crowded_objects_per_image, endpoint=True)), config.crowded_object_size
    else:
        count, sizes = int(rng.integers(*config.objects_per_image, endpoint=True)), config.object_size
    canvas = _Canvas(_background(rng, image_size, config.backgrounds), 1.0 - config.max_occlusion, count)
    distractors = [True] * int(rng.integers(*config.distractor_strokes, endpoint=True))
    distractors += [False] * int(rng.integers(*config.distractor_patches, endpoint=True))
    # Distractors go in before, between and after the objects: under some, over others.
    slots = rng.integers(0, count + 1, len(distractors))
    objects = []
    for i in range(count + 1):
        for stroke in np.asarray(distractors)[slots == i]:
            _draw_distractor(rng, canvas, bool(stroke), config)
        if i == count:
            break
        label = int(rng.integers(len(config.classes)))
        longest = float(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1]))))
        box = _place_object(rng, canvas, config.classes[label], longest, config)
        if box is not None:
            objects.append((label, box))
    field = cv2.resize(rng.uniform(-1.0, 1.0, (3, 3)).astype(np.float32), (image_size, image_size))
    image = canvas.image * (1.0 + config.shading * field)[..., None]
    if rng.random() < config.blur_prob:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))
    image = image + _noise(rng, rng.uniform(0.0, config.noise_std), image.shape[:2] + (1,))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


# --- datasets ----------------------------------------------------------------------------------------------


def generate_dataset(
    out_dir, num_images: int, seed: int, image_size: int = 320, config: Optional[ShapesConfig] = None
) -> Dict:
    """Writes ``num_images`` images and their COCO json into ``out_dir`` (layout in the module docstring).

    Deterministic in ``(num_images, seed, image_size, config)``: same json bytes and pixels on every run.

    Returns:
        dict: the COCO json written (``images``, ``annotations``, ``categories``, ``info``).
    """
    config = config or ShapesConfig()
    out_dir = Path(out_dir)
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
        pixels, objects = _draw_image(np.random.default_rng(child), image_size, config)
        file_name = f"{index:06d}.{config.image_format}"
        if config.image_format == "jpg":
            Image.fromarray(pixels).save(out_dir / IMAGES / file_name, quality=95)
        else:
            Image.fromarray(pixels).save(out_dir / IMAGES / file_name)
        images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for label, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": "TOOD procedurally generated shapes",
            "version": VERSION,
            "seed": seed,
            "image_size": image_size,
            "config": dataclasses.asdict(config),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(config.classes)],
    }
    # Written last: a folder holding annotations.json is complete.
    (out_dir / ANNOTATIONS).write_text(json.dumps(coco, separators=(",", ":")))
    return coco


def datasets_root() -> Path:
    """Where generated datasets are cached: ``$TOOD_DATASETS``, default ``./datasets`` (as DETECTRON2_DATASETS)."""
    return Path(os.environ.get("TOOD_DATASETS", "datasets"))


def dataset_dir_name(num_images: int, seed: int, image_size: int = 320, config: Optional[ShapesConfig] = None) -> str:
    """Cache folder name: the version and a hash of everything the content depends on, so no stale reuse."""
    key = {
        "version": VERSION,
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
        "config": dataclasses.asdict(config or ShapesConfig()),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"tood_shapes_v{VERSION}_{num_images}x{image_size}px_seed{seed}_{digest}"


def get_shapes_dataset(
    num_images: int, seed: int, image_size: int = 320, config: Optional[ShapesConfig] = None, root=None
) -> Path:
    """The cached dataset folder under ``root`` (default :func:`datasets_root`), generated first if absent.

    Generation goes to a private temporary folder renamed into place in one step, so processes that generate
    at once (e.g. DDP workers) never see a half-written dataset: the first rename wins, the others discard
    their copy. A temporary folder left by a killed process is never read.
    """
    root = Path(root) if root is not None else datasets_root()
    final = root / dataset_dir_name(num_images, seed, image_size, config)
    if (final / ANNOTATIONS).is_file():
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists without {ANNOTATIONS}: it was not written by this module; remove it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    start = time.perf_counter()
    logger.info(f"Generating {num_images} synthetic shape images into {final} ...")
    try:
        generate_dataset(tmp, num_images, seed, image_size, config)
        os.rename(tmp, final)
    except OSError:
        if not (final / ANNOTATIONS).is_file():
            raise
        logger.info(f"{final} was generated by another process meanwhile; using it")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info(f"Generated {final} in {time.perf_counter() - start:.1f}s")
    return final


def register_shapes_dataset(
    name: str, num_images: int, seed: int, image_size: int = 320, config: Optional[ShapesConfig] = None, root=None
) -> Path:
    """Registers a shapes dataset in Detectron2's catalogs under ``name``; returns its (future) folder.

    The dataset is generated when ``DatasetCatalog.get(name)`` is first called, not here. The metadata
    (``thing_classes``, ``json_file``, ``image_root``, ``evaluator_type`` "coco", ``generated_on_load``) is set
    now; ``json_file`` exists only after that first ``get``, so build the data loader before a COCOEvaluator.
    ``root`` is read now (default ``$TOOD_DATASETS``). Registering a name again replaces its previous registration.
    """
    config = config or ShapesConfig()
    root = Path(root) if root is not None else datasets_root()
    folder = root / dataset_dir_name(num_images, seed, image_size, config)

    def load() -> List[Dict]:
        get_shapes_dataset(num_images, seed, image_size, config, root)
        return load_coco_json(str(folder / ANNOTATIONS), str(folder / IMAGES), name)

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(config.classes),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(config.classes))},
        json_file=str(folder / ANNOTATIONS),
        image_root=str(folder / IMAGES),
        evaluator_type="coco",
        generated_on_load=True,  # the files above appear on first load: nothing is missing before
    )
    return folder


def register_all(root=None) -> None:
    """Registers the default splits of :data:`DEFAULT_SPLITS` (``tood_shapes_train``, ``_val``, ``_tune``)."""
    for name, (num_images, seed) in DEFAULT_SPLITS.items():
        register_shapes_dataset(name, num_images, seed, root=root)


def _summary(coco: Dict) -> str:
    counts = np.bincount([a["image_id"] - 1 for a in coco["annotations"]], minlength=len(coco["images"]))
    longest = np.array([max(a["bbox"][2:]) for a in coco["annotations"]] or [0])
    per_class = np.bincount([a["category_id"] - 1 for a in coco["annotations"]], minlength=len(coco["categories"]))
    classes = ", ".join(f"{c['name']} {n}" for c, n in zip(coco["categories"], per_class))
    return (
        f"{len(coco['images'])} images, {len(coco['annotations'])} objects; per image: mean {counts.mean():.1f}, "
        f"max {counts.max()}, {(counts == 0).sum()} empty, {(counts >= 20).sum()} with >= 20; "
        f"longest box side {longest.min()}..{longest.max()} px (median {np.median(longest):.0f}); {classes}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a TOOD synthetic shapes dataset (COCO json + images).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    coco = generate_dataset(
        args.out, args.num_images, args.seed, args.image_size, ShapesConfig(image_format=args.format)
    )
    print(f"Wrote {Path(args.out) / ANNOTATIONS} and {Path(args.out) / IMAGES} in {time.perf_counter() - start:.1f}s")
    print(_summary(coco))


if __name__ == "__main__":
    main()
