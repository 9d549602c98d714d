"""How well a dense detector's classification score ranks its own boxes: the task alignment TOOD claims.

Works for any Detectron2 dense detector with an adapter (:func:`register_adapter`; TOOD, RetinaNet and FCOS are
built in). :func:`dense_predictions` runs a model on a batch and returns, per image, every pre-NMS prediction:
the model's final classification score (TOOD: P; RetinaNet: sigmoid(logits); FCOS: sqrt(sigmoid(cls) *
sigmoid(ctrness))) and its decoded box, in pixels of the model's input (after the test-time resize).

Per ground-truth object, its *candidates* are the predictions whose box has IoU > ``min_iou`` (default 0.1)
with it; their score is the score of the object's class. A threshold above 0 leaves out the many predictions
that merely touch the object, whose near-zero IoU and score would make any detector look correlated, and keeps
the poorly localised ones that NMS still has to rank. A prediction may be a candidate of several objects.

Metrics, aggregated over a dataset by :class:`AlignmentEvaluator`:

* ``pcc``: Pearson correlation between score and IoU over an object's candidates, averaged over objects;
  objects with fewer than 2 candidates or a constant score or IoU are skipped (``pcc_objects`` counts the rest).
* ``top1_agreement``: share of objects (with >= 1 candidate) whose highest-scoring candidate has the highest
  IoU among their candidates (IoU ties count as agreement).
* ``top1_iou``: mean IoU of the highest-scoring candidate, over the same objects.
* ``nms_misrank_rate``: class-wise NMS (``batched_nms``, the model's own IoU threshold) on the predictions
  scoring above the model's test score threshold, every (location, class) pair a box. A box matches the object
  of its class it overlaps most, if that IoU > ``min_iou``. A suppressed box was suppressed by the first kept box
  of its class (in NMS order) that overlaps it above the threshold. Over kept boxes that suppressed at least one
  box matching the same object as themselves (``nms_kept``), the share for which one of those boxes has a higher
  IoU with that object (``nms_misranked``): NMS threw away a better box.

``studies/alignment_report.py`` (``tools/analyze_alignment.py``) runs this for several models on a dataset and
writes the table, a score-vs-IoU scatter plot and the score and IoU maps of a few objects.
"""

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.layers import batched_nms
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import Tensor
from torchvision.ops import box_iou

from .meta_arch import TOOD

__all__ = [
    "AlignmentEvaluator",
    "DensePredictions",
    "ObjectAlignment",
    "ObjectMaps",
    "dense_predictions",
    "evaluate_alignment",
    "nms_misranks",
    "object_alignment",
    "object_maps",
    "register_adapter",
]

# An adapter turns a model's head outputs into per-level scores (N, Hi * Wi * Ai, K) and boxes (N, Hi * Wi * Ai, 4)
# xyxy input pixels, location-major as ``permute_to_N_HWA_K``, and gives the centre offset of a level's cells in
# strides (cell (x, y) of stride s is centred at ((x + offset) * s, (y + offset) * s)).
Adapter = Callable[[DenseDetector, List[Tensor], tuple], Tuple[List[Tensor], List[Tensor], float]]
_ADAPTERS: Dict[type, Adapter] = {}

logger = logging.getLogger(__name__)


def register_adapter(meta_arch: type) -> Callable[[Adapter], Adapter]:
    """Decorator registering ``fn(model, features, head_outputs) -> (scores, boxes, cell_offset)`` for a class.

    ``features`` are the head's inputs, per level (N, C, Hi, Wi); ``head_outputs`` is what ``model.head`` returns.
    Subclasses of ``meta_arch`` use it too, unless they have their own.
    """

    def register(fn: Adapter) -> Adapter:
        _ADAPTERS[meta_arch] = fn
        return fn

    return register


@register_adapter(TOOD)
def _tood(model: TOOD, features, head_outputs):
    scores, boxes = model.level_predictions(head_outputs)
    return scores, boxes, 0.0


def _anchor_boxes(model, features, deltas: List[Tensor]) -> List[Tensor]:
    """Per-level deltas (N, R, 4) applied to the model's anchors with its own box transform."""
    anchors = model.anchor_generator(features)
    return [
        model.box2box_transform.apply_deltas(d.reshape(-1, 4), a.tensor.repeat(d.shape[0], 1)).view_as(d)
        for d, a in zip(deltas, anchors)
    ]


@register_adapter(RetinaNet)
def _retinanet(model: RetinaNet, features, head_outputs):
    logits, deltas = model._transpose_dense_predictions(head_outputs, [model.num_classes, 4])
    return [x.sigmoid() for x in logits], _anchor_boxes(model, features, deltas), model.anchor_generator.offset


@register_adapter(FCOS)
def _fcos(model: FCOS, features, head_outputs):
    logits, deltas, ctrness = model._transpose_dense_predictions(head_outputs, [model.num_classes, 4, 1])
    # As FCOS.forward_inference (FCOS v2's eq. 4).
    scores = [torch.sqrt(x.sigmoid() * c.sigmoid()) for x, c in zip(logits, ctrness)]
    return scores, _anchor_boxes(model, features, deltas), model.anchor_generator.offset


def _adapter(model) -> Adapter:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    supported = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise TypeError(
        f"No alignment adapter for model class {type(model).__name__} ({type(model).__module__}); supported: "
        f"{supported}. Add one with tood.alignment.register_adapter."
    )


@dataclass
class DensePredictions:
    """Every pre-NMS prediction of one image, levels concatenated, location-major within a level.

    Attributes:
        scores: (A, K) the model's final classification scores, A = sum over levels of Hi * Wi * anchors_per_cell.
        boxes: (A, 4) xyxy in pixels of the model's input (the resized image; padding is bottom/right only).
        level_sizes: (Hi, Wi) of each level.
        strides: stride of each level.
        anchors_per_cell: predictions per location (RetinaNet: 9; TOOD, FCOS: 1).
        cell_offset: centre of cell (x, y) of stride s is ((x + cell_offset) * s, (y + cell_offset) * s).
        image_size: (h, w) of the input image before padding.
    """

    scores: Tensor
    boxes: Tensor
    level_sizes: List[Tuple[int, int]]
    strides: List[int]
    anchors_per_cell: int
    cell_offset: float
    image_size: Tuple[int, int]

    def level_ranges(self) -> List[Tuple[int, int]]:
        """[start, end) of each level's predictions along A."""
        counts = [h * w * self.anchors_per_cell for h, w in self.level_sizes]
        ends = np.cumsum(counts).tolist()
        return [(end - n, end) for n, end in zip(counts, ends)]


@torch.no_grad()
def dense_predictions(model: DenseDetector, batched_inputs: List[Dict]) -> List[DensePredictions]:
    """Runs ``model`` (in eval mode) on a batch as its inference does, stopping before thresholds and NMS.

    Args:
        batched_inputs: as the model's ``forward`` takes them (dicts with "image" (C, H, W)).

    Returns:
        one :class:`DensePredictions` per image.
    """
    adapter = _adapter(model)
    if model.training:
        raise ValueError("dense_predictions needs the model in eval mode (model.eval())")
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    scores, boxes, cell_offset = adapter(model, features, model.head(features))
    sizes = [tuple(x.shape[-2:]) for x in features]
    shapes = model.backbone.output_shape()
    strides = [shapes[f].stride for f in model.head_in_features]
    anchors_per_cell = scores[0].shape[1] // (sizes[0][0] * sizes[0][1])
    return [
        DensePredictions(
            scores=torch.cat([x[i] for x in scores]),
            boxes=torch.cat([x[i] for x in boxes]),
            level_sizes=sizes,
            strides=strides,
            anchors_per_cell=anchors_per_cell,
            cell_offset=float(cell_offset),
            image_size=tuple(image_size),
        )
        for i, image_size in enumerate(images.image_sizes)
    ]


@dataclass
class ObjectAlignment:
    """The per-object metrics; None where undefined (see the module docstring)."""

    num_candidates: int
    pcc: Optional[float]
    top1_agrees: Optional[bool]
    top1_iou: Optional[float]


def object_alignment(scores: Tensor, ious: Tensor) -> ObjectAlignment:
    """
    Args:
        scores: (C,) scores of one object's candidates for its class.
        ious: (C,) their IoU with the object.
    """
    n = scores.numel()
    if n == 0:
        return ObjectAlignment(0, None, None, None)
    top = int(scores.argmax())
    top_iou = float(ious[top])
    pcc = None
    if n >= 2:
        x, y = scores.double(), ious.double()
        x, y = x - x.mean(), y - y.mean()
        denom = x.norm() * y.norm()
        if denom > 0:
            pcc = float((x @ y) / denom)
    return ObjectAlignment(n, pcc, top_iou >= float(ious.max()), top_iou)


def _matched_gt(boxes: Tensor, classes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, min_iou: float):
    """Object of each box: the one of its class it overlaps most (needs G >= 1).

    Returns:
        gt index (B,), IoU with it (B,; -1 without an object of the class), matched (B,) bool: IoU > min_iou.
    """
    ious = box_iou(boxes, gt_boxes)
    ious = torch.where(classes[:, None] == gt_classes[None, :], ious, ious.new_tensor(-1.0))
    best_iou, gt_idx = ious.max(dim=1)
    return gt_idx, best_iou, best_iou > min_iou


def nms_misranks(
    scores: Tensor,
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    *,
    nms_thresh: float,
    score_thresh: float,
    min_iou: float = 0.1,
) -> Tuple[int, int]:
    """Class-wise NMS on one image's (location, class) pairs scoring above ``score_thresh``, then counts.

    Args:
        scores: (A, K); boxes: (A, 4) xyxy; gt_boxes: (G, 4) xyxy in the same pixels; gt_classes: (G,).

    Returns:
        (kept boxes that suppressed >= 1 box matching their object, those of them that suppressed a box with a
        higher IoU with that object); see the module docstring.
    """
    anchor_idx, classes = torch.nonzero(scores > score_thresh, as_tuple=True)
    if len(anchor_idx) == 0 or len(gt_boxes) == 0:
        return 0, 0
    pair_boxes = boxes[anchor_idx]
    keep = batched_nms(pair_boxes, scores[anchor_idx, classes], classes, nms_thresh)
    removed = torch.ones(len(pair_boxes), dtype=torch.bool, device=boxes.device)
    removed[keep] = False
    removed = torch.nonzero(removed)[:, 0]
    # Greedy NMS removes a box with the first kept box of its class (keep is in NMS order) overlapping it enough.
    overlaps = (box_iou(pair_boxes[removed], pair_boxes[keep]) > nms_thresh) & (
        classes[removed][:, None] == classes[keep][None, :]
    )
    # Boxes within rounding of the threshold may find none: they are left out.
    found = overlaps.any(dim=1)
    removed = removed[found]
    suppressor = keep[overlaps[found].int().argmax(dim=1)]

    gt_idx, iou, matched = _matched_gt(pair_boxes, classes, gt_boxes, gt_classes, min_iou)
    same = matched[removed] & matched[suppressor] & (gt_idx[removed] == gt_idx[suppressor])
    kept = suppressor[same].unique()
    misranked = suppressor[same & (iou[removed] > iou[suppressor])].unique()
    return len(kept), len(misranked)


@dataclass
class ObjectMaps:
    """One object's score and IoU per cell of one level (the paper's Fig. 1 maps).

    Attributes:
        level: index of the level holding the object's highest-scoring candidate.
        stride, cell_offset: place cell (x, y) at pixel ((x + cell_offset) * stride, (y + cell_offset) * stride).
        score: (H, W) score of the object's class; with several anchors per cell, the best anchor's.
        iou: (H, W) IoU with the object of that anchor's box.
    """

    level: int
    stride: int
    cell_offset: float
    score: Tensor
    iou: Tensor


def object_maps(dense: DensePredictions, gt_box: Tensor, gt_class: int, min_iou: float = 0.1) -> Optional[ObjectMaps]:
    """Maps of one object (``gt_box`` (4,) xyxy input pixels) at its best level; None if it has no candidates."""
    ious = box_iou(dense.boxes, gt_box[None])[:, 0]
    scores = dense.scores[:, gt_class]
    candidates = ious > min_iou
    if not candidates.any():
        return None
    best = int(torch.where(candidates, scores, scores.new_tensor(-1.0)).argmax())
    ranges = dense.level_ranges()
    level = next(i for i, (start, end) in enumerate(ranges) if start <= best < end)
    start, end = ranges[level]
    h, w = dense.level_sizes[level]
    cell_scores = scores[start:end].reshape(h, w, dense.anchors_per_cell)
    score, anchor = cell_scores.max(dim=2)
    iou = ious[start:end].reshape(h, w, dense.anchors_per_cell).gather(2, anchor[..., None])[..., 0]
    return ObjectMaps(level, dense.strides[level], dense.cell_offset, score, iou)


class AlignmentEvaluator:
    """Accumulates the metrics of the module docstring over images; ``evaluate()`` gives the dataset's numbers.

    Also keeps (IoU, score) pairs of up to ``scatter_points_per_object`` random candidates per object for a
    scatter plot (:meth:`scatter_points`), so memory stays bounded on large datasets.
    """

    def __init__(
        self,
        *,
        nms_thresh: float,
        score_thresh: float,
        min_iou: float = 0.1,
        scatter_points_per_object: int = 50,
        seed: int = 0,
    ):
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_iou = min_iou
        self.scatter_points_per_object = scatter_points_per_object
        self._generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.objects: List[ObjectAlignment] = []
        self.num_images = 0
        self.nms_kept = 0
        self.nms_misranked = 0
        self._scatter: List[Tuple[Tensor, Tensor]] = []

    def process(self, dense: DensePredictions, gt_boxes: Tensor, gt_classes: Tensor) -> List[ObjectAlignment]:
        """Adds one image; ``gt_boxes`` (G, 4) xyxy in the input pixels of ``dense``, ``gt_classes`` (G,).

        Returns:
            the image's per-object metrics.
        """
        gt_boxes, gt_classes = gt_boxes.to(dense.boxes.device), gt_classes.to(dense.boxes.device)
        ious = box_iou(dense.boxes, gt_boxes)  # (A, G)
        results = []
        for g in range(len(gt_boxes)):
            candidates = ious[:, g] > self.min_iou
            scores = dense.scores[candidates, gt_classes[g]].float().cpu()
            cand_ious = ious[candidates, g].float().cpu()
            results.append(object_alignment(scores, cand_ious))
            sample = torch.randperm(len(scores), generator=self._generator)[: self.scatter_points_per_object]
            self._scatter.append((cand_ious[sample], scores[sample]))
        kept, misranked = nms_misranks(
            dense.scores,
            dense.boxes,
            gt_boxes,
            gt_classes,
            nms_thresh=self.nms_thresh,
            score_thresh=self.score_thresh,
            min_iou=self.min_iou,
        )
        self.nms_kept += kept
        self.nms_misranked += misranked
        self.objects += results
        self.num_images += 1
        return results

    def evaluate(self) -> Dict[str, Optional[float]]:
        """The dataset's metrics; a metric with nothing to average is None."""
        pccs = [o.pcc for o in self.objects if o.pcc is not None]
        ranked = [o for o in self.objects if o.num_candidates > 0]
        return {
            "pcc": float(np.mean(pccs)) if pccs else None,
            "top1_agreement": float(np.mean([o.top1_agrees for o in ranked])) if ranked else None,
            "top1_iou": float(np.mean([o.top1_iou for o in ranked])) if ranked else None,
            "nms_misrank_rate": self.nms_misranked / self.nms_kept if self.nms_kept else None,
            "num_images": self.num_images,
            "num_objects": len(self.objects),
            "objects_with_candidates": len(ranked),
            "pcc_objects": len(pccs),
            "nms_kept": self.nms_kept,
            "nms_misranked": self.nms_misranked,
            "min_iou": self.min_iou,
            "nms_thresh": self.nms_thresh,
            "score_thresh": self.score_thresh,
        }

    def scatter_points(self) -> Tuple[np.ndarray, np.ndarray]:
        """(IoU, score) of the sampled candidates, two (P,) arrays."""
        if not self._scatter:
            return np.zeros(0), np.zeros(0)
        return tuple(torch.cat(x).numpy() for x in zip(*self._scatter))


def evaluate_alignment(
    model: DenseDetector,
    data_loader,
    *,
    min_iou: float = 0.1,
    max_images: Optional[int] = None,
    on_image: Optional[Callable[[Dict, DensePredictions], None]] = None,
) -> AlignmentEvaluator:
    """Runs ``model`` over ``data_loader`` and accumulates the metrics with the model's own NMS and score thresholds.

    Args:
        data_loader: yields lists of dicts holding "image" and "instances" (ground truth with ``gt_boxes`` and
            ``gt_classes`` in the image tensor's pixels), e.g. a test loader whose ``DatasetMapper`` has
            ``is_train=True`` and the test augmentations (Detectron2's test mapper drops the annotations).
        max_images: stop after this many images.
        on_image: called with each input dict and its :class:`DensePredictions` (to draw figures).

    Returns:
        the evaluator; ``.evaluate()`` gives the metrics.
    """
    evaluator = AlignmentEvaluator(
        nms_thresh=model.test_nms_thresh, score_thresh=model.test_score_thresh, min_iou=min_iou
    )
    for batched_inputs in data_loader:
        if max_images is not None and evaluator.num_images >= max_images:
            break
        if max_images is not None:
            batched_inputs = batched_inputs[: max_images - evaluator.num_images]
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "inputs without 'instances': the data loader must keep the ground truth (DatasetMapper(is_train=True))"
            )
        for inputs, dense in zip(batched_inputs, dense_predictions(model, batched_inputs)):
            gt = inputs["instances"]
            evaluator.process(dense, gt.gt_boxes.tensor, gt.gt_classes)
            if on_image is not None:
                on_image(inputs, dense)
    return evaluator
