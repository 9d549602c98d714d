"""Losses of TOOD and the criterion that turns flattened head outputs and ground truth into the loss dict.

Semantics of mmdetection 3.3's ``TOODHead.loss_by_feat``: warm-up (ATSS targets) uses focal loss on probabilities
and GIoU weighted by the ATSS centerness, normalised by the number of positives and the centerness sum; task
alignment learning uses quality focal loss with the targets t_hat and GIoU weighted by t_hat, both normalised by
the sum of t_hat. Normalisers are averaged over ranks (so that DDP's gradient averaging gives the global loss) and
clamped to >= 1. Every loss is computed in float32 under autocast, and in float64 for a float64 model.
"""

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import Tensor, nn

from .assigner import IOU_EPS, ATSSAssigner, TaskAlignedAssigner, paired_box_iou
from .layers import at_least_float32

__all__ = ["TOODLoss", "TOODTargets", "focal_loss_prob", "giou_loss", "quality_focal_loss_prob"]


def focal_loss_prob(probs: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al.) on probabilities, per element.

    Args:
        probs: (..., K) probabilities.
        labels: (...) class indices, K for background.

    Returns:
        (..., K) loss.
    """
    num_classes = probs.shape[-1]
    target = F.one_hot(labels, num_classes + 1)[..., :num_classes].to(probs.dtype)
    pt = (1 - probs) * target + probs * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy(probs, target, reduction="none") * focal_weight


def quality_focal_loss_prob(probs: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss (Li et al., GFL) on probabilities, per element.

    The target of an element is ``quality`` at the labelled class of a positive, 0 elsewhere; the loss is
    ``|target - p|^beta * BCE(p, target)``.

    Args:
        probs: (..., K) probabilities.
        labels: (...) class indices, K for background.
        quality: (...) target quality of each positive (ignored for background).

    Returns:
        (..., K) loss.
    """
    loss = F.binary_cross_entropy(probs, torch.zeros_like(probs), reduction="none") * probs.pow(beta)
    pos = (labels < probs.shape[-1]).nonzero(as_tuple=True)
    index = (*pos, labels[pos])
    p, q = probs[index], quality[pos].to(probs.dtype)
    return loss.index_put(index, F.binary_cross_entropy(p, q, reduction="none") * (q - p).abs().pow(beta))


def giou_loss(pred: Tensor, target: Tensor, eps: float = IOU_EPS) -> Tensor:
    """``1 - GIoU`` of corresponding xyxy boxes ``(..., 4)``.

    mmdet's arithmetic: union and enclosing area are clamped to ``eps``. ``torchvision.ops.generalized_box_iou_loss``
    adds its eps (1e-7) to both instead, which gives different floats.
    """
    iou, union = paired_box_iou(pred, target, eps)
    enclose_wh = (torch.max(pred[..., 2:], target[..., 2:]) - torch.min(pred[..., :2], target[..., :2])).clamp(min=0)
    # Capping the areas at the largest float changes no finite value and keeps inf - inf out of diverging runs.
    largest = torch.finfo(enclose_wh.dtype).max
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps, max=largest)
    union = union.clamp(max=largest)
    return 1 - (iou - (enclose - union) / enclose)


def centerness(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of points ``(M, 2)`` in boxes ``(M, 4)``.

    Only meaningful for points inside their box (positives are), otherwise NaN.
    """
    left_right = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], dim=1)
    top_bottom = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], dim=1)
    return torch.sqrt(
        (left_right.min(dim=1).values / left_right.max(dim=1).values)
        * (top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)
    )


def _reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks of ``x`` (each rank's own value when not distributed)."""
    world_size = comm.get_world_size()
    if world_size > 1:
        x = x.clone()
        dist.all_reduce(x.div_(world_size))
    return x


class TOODTargets(NamedTuple):
    labels: Tensor  #: (N, A) long: class of the assigned GT, K (number of classes) for background
    bbox_targets: Tensor  #: (N, A, 4) assigned GT box, xyxy pixels; 0 for negatives
    alignment_metrics: Tensor  #: (N, A) classification quality target: 1 per positive in warm-up, t_hat in TAL
    bbox_weights: Tensor  #: (N, A) GIoU weight: ATSS centerness in warm-up, t_hat in TAL; 0 for negatives
    label_weights: Tensor  #: (N, A) classification weight: 1, or 0 for anchors outside their image's padded extent


class TOODLoss(nn.Module):
    """Task alignment learning: assignment, targets and losses of TOOD from flattened head outputs.

    Flattened layout: anchors of all levels concatenated, each level row-major over (y, x) (see ``priors.py``).
    Every argument is keyword-configurable, e.g. from a LazyConfig ``L(TOODLoss)(num_classes=80, tal_topk=13)``,
    or read from a yacs config: ``TOODLoss(cfg)``. It has no parameters.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        atss_topk: int = 9,
        tal_topk: int = 13,
        alpha: float = 1.0,
        beta: float = 6.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        qfl_beta: float = 2.0,
        cls_weight: float = 1.0,
        bbox_weight: float = 2.0,
        memory_budget_mb: float = 256.0,
    ):
        """
        Args:
            num_classes: K, the number of foreground classes; K is also the background label of the targets.
            atss_topk: candidates per level and GT of the warm-up ATSS assignment.
            tal_topk, alpha, beta: candidates per GT and metric exponents of the task-aligned assignment.
            focal_alpha, focal_gamma: focal loss (warm-up classification).
            qfl_beta: quality focal loss (task-aligned classification).
            cls_weight, bbox_weight: weights of the classification and GIoU losses.
            memory_budget_mb: working-set bound of the assigners (see ``TaskAlignedAssigner``).
        """
        super().__init__()
        self.num_classes = num_classes
        self.atss_assigner = ATSSAssigner(topk=atss_topk, memory_budget_mb=memory_budget_mb)
        self.tal_assigner = TaskAlignedAssigner(
            topk=tal_topk, alpha=alpha, beta=beta, memory_budget_mb=memory_budget_mb
        )
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.qfl_beta = qfl_beta
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight

    @classmethod
    def from_config(cls, cfg):
        """Arguments from ``cfg.MODEL.TOOD`` (see :func:`tood.config.add_tood_config`); absent keys keep the
        constructor's defaults."""
        keys = {
            "NUM_CLASSES": "num_classes",
            "ATSS_TOPK": "atss_topk",
            "TAL_TOPK": "tal_topk",
            "TAL_ALPHA": "alpha",
            "TAL_BETA": "beta",
            "FOCAL_LOSS_ALPHA": "focal_alpha",
            "FOCAL_LOSS_GAMMA": "focal_gamma",
            "QFL_BETA": "qfl_beta",
            "CLS_LOSS_WEIGHT": "cls_weight",
            "BBOX_REG_LOSS_WEIGHT": "bbox_weight",
            "ASSIGNER_MEMORY_BUDGET_MB": "memory_budget_mb",
        }
        node = cfg.MODEL.TOOD
        return {arg: node[key] for key, arg in keys.items() if key in node}

    def forward(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        prior_boxes: Tensor,
        prior_points: Tensor,
        num_anchors_per_level: Sequence[int],
        strides_per_anchor: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        warmup: bool,
        valid_mask: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        """
        Args:
            cls_scores: (N, A, K) class probabilities (the aligned scores P, no further sigmoid).
            bbox_preds: (N, A, 4) aligned boxes, xyxy pixels (stride units multiplied by the stride).
            prior_boxes: (A, 4) xyxy pixels, used by ATSS.
            prior_points: (A, 2) anchor centres, pixels.
            num_anchors_per_level: priors per level, summing to A.
            strides_per_anchor: (A,) stride of each anchor's level.
            gt_boxes: N tensors (n_i, 4) xyxy pixels.
            gt_labels: N tensors (n_i,) class indices in [0, K).
            warmup: ATSS targets and focal loss if True, task alignment learning otherwise.
            valid_mask: optional (N, A) bool, False for anchors that lie outside their image padded to the size
                divisibility (they only see another image's batch padding): never assigned, no loss, as the
                reference's valid flags.

        Returns:
            {"loss_cls", "loss_box_reg"}: scalars in the dtype of ``at_least_float32(cls_scores)``.
        """
        if not torch.isfinite(cls_scores).all():
            # Diverged weights: binary cross-entropy refuses probabilities outside [0, 1]. NaN losses (still attached
            # to the graph, so that backward runs) let the trainer's finite-loss check stop the run with its message.
            nan = cls_scores.sum() * float("nan")
            return {"loss_cls": nan, "loss_box_reg": nan}
        targets = self.get_targets(
            cls_scores,
            bbox_preds,
            prior_boxes,
            prior_points,
            num_anchors_per_level,
            gt_boxes,
            gt_labels,
            warmup,
            valid_mask,
        )
        cls_losses, box_losses = self.anchor_losses(cls_scores, bbox_preds, strides_per_anchor, targets, warmup)
        cls_norm, box_norm = self.normalizers(targets)
        return {"loss_cls": cls_losses.sum() / cls_norm, "loss_box_reg": box_losses.sum() / box_norm}

    def get_targets(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        prior_boxes: Tensor,
        prior_points: Tensor,
        num_anchors_per_level: Sequence[int],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        warmup: bool,
        valid_mask: Optional[Tensor] = None,
    ) -> TOODTargets:
        """Assign every anchor (arguments as ``forward``; predictions are only read, detached)."""
        num_imgs, num_anchors, num_classes = cls_scores.shape
        if num_classes != self.num_classes:
            raise ValueError(f"expected scores of {self.num_classes} classes, got shape {tuple(cls_scores.shape)}")
        if warmup:
            gt_index = self.atss_assigner(prior_boxes, num_anchors_per_level, gt_boxes, valid_mask).gt_index
        else:
            if valid_mask is not None:
                # A zero score gives a zero alignment metric: such anchors can never be assigned.
                cls_scores = cls_scores.detach() * valid_mask[..., None]
            assigned = self.tal_assigner(cls_scores, bbox_preds, prior_points, gt_boxes, gt_labels)
            gt_index = assigned.gt_index
        pos = (gt_index >= 0).nonzero(as_tuple=True)
        # Targets in the dtype the losses are computed in (float32, or float64 for a float64 model).
        device, dtype = cls_scores.device, torch.promote_types(bbox_preds.dtype, torch.float32)
        labels = torch.full((num_imgs, num_anchors), num_classes, dtype=torch.long, device=device)
        bbox_targets = torch.zeros(num_imgs, num_anchors, 4, device=device, dtype=dtype)
        if pos[0].numel():
            img, gt = pos[0], gt_index[pos]
            offsets = torch.tensor([0] + [len(b) for b in gt_boxes], device=device).cumsum(0)[img]
            labels[pos] = torch.cat([lab.to(device) for lab in gt_labels])[offsets + gt]
            bbox_targets[pos] = torch.cat([b.to(device=device, dtype=dtype) for b in gt_boxes])[offsets + gt]
        if warmup:
            alignment_metrics = (gt_index >= 0).to(dtype)
            bbox_weights = torch.zeros(num_imgs, num_anchors, device=device, dtype=dtype)
            bbox_weights[pos] = centerness(prior_points.to(dtype)[pos[1]], bbox_targets[pos])
        else:
            alignment_metrics = bbox_weights = assigned.alignment_target.to(dtype)
        if valid_mask is None:
            label_weights = torch.ones(num_imgs, num_anchors, device=device, dtype=dtype)
        else:
            label_weights = valid_mask.to(dtype)
        return TOODTargets(labels, bbox_targets, alignment_metrics, bbox_weights, label_weights)

    def anchor_losses(
        self, cls_scores: Tensor, bbox_preds: Tensor, strides_per_anchor: Tensor, targets: TOODTargets, warmup: bool
    ) -> Tuple[Tensor, Tensor]:
        """Weighted, unnormalised classification and GIoU losses of every anchor, two (N, A) tensors (float32, or
        float64 for float64 predictions)."""
        with torch.autocast(cls_scores.device.type, enabled=False):
            probs, boxes = at_least_float32(cls_scores), at_least_float32(bbox_preds)
            if warmup:
                cls_losses = focal_loss_prob(probs, targets.labels, self.focal_alpha, self.focal_gamma)
            else:
                cls_losses = quality_focal_loss_prob(probs, targets.labels, targets.alignment_metrics, self.qfl_beta)
            pos = (targets.labels < probs.shape[-1]).nonzero(as_tuple=True)
            # mmdet computes GIoU in stride units; dividing the pixels back only changes floats near the eps clamp.
            stride = strides_per_anchor.to(boxes)[pos[1], None]
            giou = giou_loss(boxes[pos] / stride, targets.bbox_targets[pos] / stride)
            box_losses = boxes.new_zeros(boxes.shape[:2]).index_put(pos, giou * targets.bbox_weights[pos])
            return self.cls_weight * cls_losses.sum(-1) * targets.label_weights, self.bbox_weight * box_losses

    def normalizers(self, targets: TOODTargets) -> Tuple[Tensor, Tensor]:
        """Divisors of the summed classification and GIoU losses: rank-averaged target sums, at least 1."""
        cls_norm = _reduce_mean(targets.alignment_metrics.sum()).clamp(min=1)
        box_norm = _reduce_mean(targets.bbox_weights.sum()).clamp(min=1)
        return cls_norm, box_norm
