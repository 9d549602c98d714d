"""Label assignment of TOOD: ATSS for the warm-up epochs, task-aligned assignment (TAL) afterwards.

Both assigners follow mmdetection 3.3 (``ATSSAssigner``, ``TaskAlignedAssigner`` and the target normalisation of
``TOODHead``) to the float, but work on a whole batch: ground truth comes as per-image lists and is padded internally,
and every result is per anchor, ``(B, A)``, with ``-1`` marking negatives. GTs are processed in chunks sized so that
the working set stays within ``memory_budget_mb`` whatever the number of GTs; the chunking never changes a result.

A GT box with zero (or negative) width or height is kept but can never be positive: no anchor centre lies strictly
inside it, and its IoU with anything is 0 (not NaN).
"""

from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .layers import at_least_float32

__all__ = ["ATSSAssigner", "ATSSAssignment", "TaskAlignedAssigner", "TaskAlignment", "paired_box_iou"]

# An anchor centre is inside a GT only if all four distances to its sides exceed this (pixels), as in mmdet.
INSIDE_MARGIN = 0.01
# mmdet's bbox_overlaps clamps the union (and GIoU's enclosing area) to this before dividing.
IOU_EPS = 1e-6

# Working-set estimates (bytes per (image, GT, anchor) triple) that size the GT chunks.
_ATSS_BYTES = 16  # distances and their per-level top-k buffers (measured: ~8)
_TAL_BYTES = 128  # worst case: every predicted box overlaps every GT (measured: ~90 bytes per pair)
# Anchors per block of the TAL overlap search: blocks whose bounding box misses a GT are skipped wholesale.
_BLOCK = 16
_EMPTY_BOX = (float("inf"), float("inf"), float("-inf"), float("-inf"))  # overlaps nothing


def paired_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = IOU_EPS) -> Tuple[Tensor, Tensor]:
    """IoU of corresponding xyxy boxes ``(..., 4)`` (broadcast), and the union it divided by.

    mmdet's ``bbox_overlaps`` arithmetic: the union is clamped to ``eps``, so degenerate boxes give 0 rather than
    NaN (torchvision's ``box_iou`` divides by the raw union, and only computes all pairs of two lists).
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - overlap).clamp(min=eps)
    return overlap / union, union


def _centre_inside(points: Tensor, boxes: Tensor) -> Tensor:
    """Whether points ``(..., 2)`` lie inside boxes ``(..., 4)`` by more than ``INSIDE_MARGIN`` on every side."""
    dist = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return dist.amin(dim=-1) > INSIDE_MARGIN


def _pad_gts(gt_boxes: Sequence[Tensor], device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per-image GT boxes -> ``(B, G, 4)`` of ``dtype`` zero-padded, and ``(B, G)`` bool marking real GTs."""
    boxes = pad_sequence([b.to(device=device, dtype=dtype).reshape(-1, 4) for b in gt_boxes], batch_first=True)
    counts = torch.tensor([len(b) for b in gt_boxes], device=device)
    return boxes, torch.arange(boxes.shape[1], device=device) < counts[:, None]


def _gt_chunks(num_gts: int, bytes_per_gt: int, memory_budget_mb: float) -> Iterator[slice]:
    """Consecutive GT ranges whose working set fits the budget (at least one GT each)."""
    step = max(1, int(memory_budget_mb * 2**20) // max(bytes_per_gt, 1))
    for start in range(0, num_gts, step):
        yield slice(start, min(start + step, num_gts))


def _resolve_claims(slot: Tensor, gt: Tensor, iou: Tensor, num_slots: int) -> Tensor:
    """Winning claim of every claimed anchor slot, as a mask over the claims.

    An anchor claimed by several GTs goes to the highest IoU, ties to the lowest GT index: mmdet's argmax over GTs.
    """
    best_iou = iou.new_full((num_slots,), float("-inf")).scatter_reduce_(0, slot, iou, "amax")
    is_best = iou == best_iou[slot]
    first_gt = gt.new_full((num_slots,), torch.iinfo(gt.dtype).max)
    first_gt.scatter_reduce_(0, slot[is_best], gt[is_best], "amin")
    return is_best & (gt == first_gt[slot])


def _topk_within_groups(group: Tensor, value: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` largest values of each group (all of a group that has fewer), for ``group`` sorted.

    The groups are laid out as the rows of a padded matrix for one ``torch.topk``; equal values competing for the
    last slot are broken as ``torch.topk`` breaks them within that row.
    """
    num = len(group)
    starts = torch.ones_like(group, dtype=torch.bool)
    starts[1:] = group[1:] != group[:-1]
    start_pos = starts.nonzero().squeeze(1)
    lengths = torch.diff(start_pos, append=start_pos.new_tensor([num]))
    row = starts.cumsum(0) - 1
    col = torch.arange(num, device=group.device) - start_pos[row]
    rows = value.new_full((len(start_pos), int(lengths.max()) if num else 0), float("-inf"))
    rows[row, col] = value
    top = rows.topk(min(k, rows.shape[1]), dim=1).indices
    in_group = top < lengths[:, None]
    mask = torch.zeros_like(starts)
    mask[(start_pos[:, None] + top)[in_group]] = True
    return mask


def _overlapping(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Whether xyxy boxes (broadcast) have an intersection of positive area; both must be non-empty or _EMPTY_BOX."""
    return (
        (boxes1[..., 0] < boxes2[..., 2])
        & (boxes2[..., 0] < boxes1[..., 2])
        & (boxes1[..., 1] < boxes2[..., 3])
        & (boxes2[..., 1] < boxes1[..., 3])
    )


def _emptied(boxes: Tensor) -> Tensor:
    """Boxes with ``_EMPTY_BOX`` in place of those of no area (or NaN), which overlap nothing anyway."""
    has_area = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return torch.where(has_area[..., None], boxes, boxes.new_tensor(_EMPTY_BOX))


class ATSSAssignment(NamedTuple):
    gt_index: Tensor  #: (B, A) long: index of the assigned GT in its image's list, -1 for negatives
    iou: Tensor  #: (B, A) float: IoU of the prior box with its GT, 0 for negatives


class ATSSAssigner:
    """Adaptive training sample selection (Zhang et al., CVPR 2020) on prior boxes, TOOD's warm-up assignment.

    For each GT: the ``topk`` priors of each level nearest to its centre are candidates; those whose IoU with the GT
    is at least the mean + std (unbiased, as ``torch.std``) of the candidates' IoUs, and whose centre lies inside
    the GT, are positive. An anchor claimed by several GTs goes to the one of highest IoU.
    """

    def __init__(self, topk: int = 9, memory_budget_mb: float = 256.0):
        self.topk = topk
        self.memory_budget_mb = memory_budget_mb

    @torch.no_grad()
    def __call__(
        self,
        prior_boxes: Tensor,
        num_anchors_per_level: Sequence[int],
        gt_boxes: Sequence[Tensor],
        valid_mask: Optional[Tensor] = None,
    ) -> ATSSAssignment:
        """
        Args:
            prior_boxes: (A, 4) xyxy pixels, levels concatenated.
            num_anchors_per_level: number of priors of each level, summing to A.
            gt_boxes: B tensors (n_i, 4) xyxy pixels.
            valid_mask: optional (B, A) bool; invalid priors are never candidates. (Where a level has fewer than
                ``topk`` valid priors the remaining candidate slots hold invalid ones, which enter the IoU
                statistics but never become positive; the reference drops them from the statistics too.)
        """
        num_imgs, num_anchors = len(gt_boxes), prior_boxes.shape[0]
        priors = at_least_float32(prior_boxes)
        gts, valid = _pad_gts(gt_boxes, priors.device, priors.dtype)
        centres = (priors[:, :2] + priors[:, 2:]) / 2.0
        level_ends = torch.tensor(num_anchors_per_level).cumsum(0).tolist()
        level_starts = [0] + level_ends[:-1]

        slots, gts_won, ious = [], [], []
        for chunk in _gt_chunks(gts.shape[1], num_imgs * num_anchors * _ATSS_BYTES, self.memory_budget_mb):
            boxes = gts[:, chunk]  # (B, Gc, 4)
            box_centres = (boxes[..., :2] + boxes[..., 2:]) / 2.0
            dx = centres[:, 0] - box_centres[..., 0, None]  # (B, Gc, A)
            dy = centres[:, 1] - box_centres[..., 1, None]
            dist = dx.mul_(dx).add_(dy.mul_(dy)).sqrt_()
            if valid_mask is not None:
                dist.masked_fill_(~valid_mask[:, None], float("inf"))
            cand = torch.cat(
                [
                    dist[..., s:e].topk(min(self.topk, e - s), dim=-1, largest=False).indices + s
                    for s, e in zip(level_starts, level_ends)
                ],
                dim=-1,
            )  # (B, Gc, K)
            del dist, dx, dy
            iou = paired_box_iou(priors[cand], boxes[:, :, None])[0]
            # Reduced in mmdet's (K, GTs) layout: the mean's float rounding depends on it.
            iou_t = iou.permute(2, 0, 1).contiguous()
            threshold = iou_t.mean(0) + iou_t.std(0)
            pos = (iou >= threshold[..., None]) & _centre_inside(centres[cand], boxes[:, :, None])
            if valid_mask is not None:
                pos &= valid_mask.gather(1, cand.flatten(1)).view_as(pos)
            img, gt, k = (pos & valid[:, chunk, None]).nonzero(as_tuple=True)
            slots.append(img * num_anchors + cand[img, gt, k])
            gts_won.append(gt + chunk.start)
            ious.append(iou[img, gt, k])

        gt_index = torch.full((num_imgs * num_anchors,), -1, dtype=torch.long, device=priors.device)
        iou_out = priors.new_zeros(num_imgs * num_anchors)
        if slots:
            slot, gt, iou = torch.cat(slots), torch.cat(gts_won), torch.cat(ious)
            win = _resolve_claims(slot, gt, iou, num_imgs * num_anchors)
            gt_index[slot[win]] = gt[win]
            iou_out[slot[win]] = iou[win]
        return ATSSAssignment(gt_index.view(num_imgs, num_anchors), iou_out.view(num_imgs, num_anchors))


class TaskAlignment(NamedTuple):
    gt_index: Tensor  #: (B, A) long: index of the assigned GT in its image's list, -1 for negatives
    alignment_target: Tensor  #: (B, A) float: normalised target t_hat (0 for negatives)
    alignment_metric: Tensor  #: (B, A) float: raw metric t = s^alpha * IoU^beta with the assigned GT (0 for negatives)
    iou: Tensor  #: (B, A) float: IoU of the predicted box with the assigned GT (0 for negatives)


class _AnchorBlocks:
    """Predicted boxes of a batch, in blocks of ``_BLOCK`` consecutive anchors with their bounding boxes.

    Boxes of no area (or NaN) are replaced by ``_EMPTY_BOX``: their IoU with anything is 0 either way. The last block
    of each image is completed with empty boxes.
    """

    def __init__(self, boxes: Tensor):
        num_imgs, num_anchors, _ = boxes.shape
        self.boxes = _emptied(boxes)  # (B, A, 4)
        self.num_blocks = -(-num_anchors // _BLOCK)
        filler = boxes.new_tensor(_EMPTY_BOX).expand(num_imgs, self.num_blocks * _BLOCK - num_anchors, 4)
        blocks = torch.cat([self.boxes, filler], dim=1).view(num_imgs, self.num_blocks, _BLOCK, 4)
        self.blocks = blocks.view(-1, _BLOCK, 4)  # (B * nb, S, 4)
        self.bounds = torch.cat([blocks[..., :2].amin(dim=2), blocks[..., 2:].amax(dim=2)], dim=-1)  # (B, nb, 4)


class TaskAlignedAssigner:
    """Task-aligned assignment of TOOD (Feng et al., ICCV 2021), mmdetection 3.3 semantics, batched.

    For GT g of class c and anchor a with predicted box B_a and score s_a = P[a, c]:
    ``t = s^alpha * IoU(B_a, g)^beta``. The ``topk`` anchors of highest t over all levels together are candidates;
    a candidate is positive if ``t > 0`` and its anchor point lies inside g (more than 0.01 px from every side).
    Candidates outside g still take their top-k slot. An anchor claimed by several GTs goes to the one of highest
    IoU (ties: the lowest GT index). Each positive's target is ``t_hat = t / (max t + 1e-7) * max IoU``, both maxima
    over the positives of the same GT. Images without GT: all anchors negative. IoU uses mmdet's arithmetic; a
    predicted box of no area has IoU 0 (a NaN box too, where mmdet would propagate the NaN).

    Only anchors whose predicted box overlaps a GT can have ``t > 0``, so only those (anchor, GT) pairs are
    evaluated: blocks of consecutive anchors whose bounding box misses the GT are skipped, the others tested anchor
    by anchor. The k-th largest t of a GT is among the evaluated pairs unless fewer than k anchors have ``t > 0``,
    in which case the zero-metric anchors that fill the remaining slots could not be positive anyway. So the result
    is the dense computation's; only equal metrics competing for the last slot may be broken differently than
    ``torch.topk`` over all anchors would. Requires ``beta > 0`` (with ``beta = 0`` non-overlapping anchors have
    ``t > 0``).

    Example::

        assigner = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)
        res = assigner(scores, boxes, points, [gt_boxes_0, gt_boxes_1], [gt_labels_0, gt_labels_1])
        positives = res.gt_index >= 0  # (B, A)
        target_quality = res.alignment_target  # (B, A)
    """

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, memory_budget_mb: float = 256.0):
        """
        Args:
            topk: candidates per GT.
            alpha, beta: exponents of the score and of the IoU in the alignment metric; ``beta > 0``.
            memory_budget_mb: bound on the working set; GTs are processed in chunks that fit it (at least one GT
                per chunk, so the bound holds while one GT's worst case, B * A * 128 bytes, fits).
        """
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.memory_budget_mb = memory_budget_mb

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        anchor_points: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> TaskAlignment:
        """
        Args:
            pred_scores: (B, A, C) class probabilities (detached here).
            pred_boxes: (B, A, 4) predicted boxes, xyxy pixels (detached here).
            anchor_points: (A, 2) anchor centres, pixels.
            gt_boxes: B tensors (n_i, 4) xyxy pixels.
            gt_labels: B tensors (n_i,) class indices in [0, C).

        Returns:
            TaskAlignment of (B, A) tensors; computed in float32 (float64 for float64 boxes).
        """
        num_imgs, num_anchors, num_classes = pred_scores.shape
        device = pred_scores.device
        blocks = _AnchorBlocks(at_least_float32(pred_boxes.detach()))
        gts, valid = _pad_gts(gt_boxes, device, blocks.boxes.dtype)
        labels = pad_sequence(
            [lab.to(device=device, dtype=torch.long).reshape(-1) for lab in gt_labels], batch_first=True
        )
        num_gts = gts.shape[1]
        flat_boxes = blocks.boxes.view(-1, 4)
        flat_scores = pred_scores.detach().reshape(-1)
        points = anchor_points.to(gts.dtype)
        flat_gts = gts.view(-1, 4)
        gt_search = torch.where(valid[..., None], _emptied(gts), gts.new_tensor(_EMPTY_BOX))

        claims: List[Tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for chunk in _gt_chunks(num_gts, num_imgs * num_anchors * _TAL_BYTES, self.memory_budget_mb):
            # (image, GT, block) triples whose bounding boxes overlap, then the (GT, anchor) pairs that do.
            img, gt, blk = _overlapping(blocks.bounds[:, None], gt_search[:, chunk, None]).nonzero(as_tuple=True)
            group = img * num_gts + gt + chunk.start  # GT index in the flattened batch
            block_boxes = blocks.blocks.index_select(0, img * blocks.num_blocks + blk)
            pair, within = _overlapping(block_boxes, gt_search.view(-1, 4)[group, None]).nonzero(as_tuple=True)
            slot = (img * num_anchors + blk * _BLOCK).index_select(0, pair) + within  # anchor in the flattened batch
            group = group.index_select(0, pair)
            del img, gt, blk, block_boxes, pair, within

            gt_box = flat_gts.index_select(0, group)
            iou = paired_box_iou(flat_boxes.index_select(0, slot), gt_box)[0]
            label = labels.view(-1).index_select(0, group)
            score = flat_scores.index_select(0, slot * num_classes + label).to(iou.dtype)
            metric = score**self.alpha * iou**self.beta
            # Pairs come grouped by GT: the top-k of each group is over all levels together.
            cand = (_topk_within_groups(group, metric, self.topk) & (metric > 0)).nonzero().squeeze(1)
            slot, group, gt_box, iou, metric = (x.index_select(0, cand) for x in (slot, group, gt_box, iou, metric))
            pos = _centre_inside(points.index_select(0, slot % num_anchors), gt_box)
            claims.append((slot[pos], group[pos], iou[pos], metric[pos]))

        gt_index = torch.full((num_imgs * num_anchors,), -1, dtype=torch.long, device=device)
        target, metric_out, iou_out = (points.new_zeros(num_imgs * num_anchors) for _ in range(3))
        if claims:
            slot, group, iou, metric = (torch.cat(c) for c in zip(*claims))
            # Within an image the flattened GT index orders as the GT index: ties go to the lowest either way.
            win = _resolve_claims(slot, group, iou, num_imgs * num_anchors)
            slot, group, iou, metric = slot[win], group[win], iou[win], metric[win]
            # Normalise over each GT's final positives.
            max_metric = metric.new_zeros(num_imgs * num_gts).scatter_reduce_(0, group, metric, "amax")
            max_iou = iou.new_zeros(num_imgs * num_gts).scatter_reduce_(0, group, iou, "amax")
            gt_index[slot] = group % num_gts
            target[slot] = metric / (max_metric[group] + 1e-7) * max_iou[group]
            metric_out[slot] = metric
            iou_out[slot] = iou
        shape = (num_imgs, num_anchors)
        return TaskAlignment(gt_index.view(shape), target.view(shape), metric_out.view(shape), iou_out.view(shape))
