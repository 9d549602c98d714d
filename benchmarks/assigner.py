"""``TaskAlignedAssigner`` against a straightforward per-image implementation of the same algorithm.

:func:`reference_assign` is task-aligned assignment as the paper and mmdetection write it (dense (A, G) matrices,
one image at a time); :func:`make_inputs` gives the anchors of an 832x1152 image with random GTs and predictions;
:func:`assigner_table` times both on them, and with ``full`` also measures their extra peak memory (glibc's peak
of mapped bytes in a fresh process, :func:`benchmarks.timing.heap_peak_mb`: the resident set size is only
kept to some tens of MB) and checks that both assign every anchor identically. It is a measurement, not a test.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from tood.assigner import INSIDE_MARGIN, TaskAlignedAssigner, paired_box_iou
from tood.priors import level_boxes, multi_level_points

from .timing import heap_peak_mb, median_times

__all__ = ["assigner_table", "make_inputs", "reference_assign"]

STRIDES = (8, 16, 32, 64, 128)


def reference_assign(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    anchor_points: Tensor,
    gt_boxes: List[Tensor],
    gt_labels: List[Tensor],
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
) -> Tuple[Tensor, Tensor]:
    """Task-aligned assignment as written in the paper and mmdet: dense (A, G) matrices, one image at a time.

    Args:
        pred_scores: (B, A, C) probabilities; pred_boxes: (B, A, 4) xyxy; anchor_points: (A, 2);
        gt_boxes, gt_labels: B tensors (G_i, 4) and (G_i,).

    Returns:
        gt index (B, A), -1 for negatives, and the normalised alignment target (B, A), as
        ``TaskAlignedAssigner``'s ``gt_index`` and ``alignment_target``.
    """
    num_imgs, num_anchors, _ = pred_scores.shape
    gt_index = torch.full((num_imgs, num_anchors), -1, dtype=torch.long)
    target = torch.zeros(num_imgs, num_anchors)
    for i in range(num_imgs):
        gts, labels = gt_boxes[i], gt_labels[i]
        if len(gts) == 0:
            continue
        iou = paired_box_iou(pred_boxes[i][:, None], gts[None])[0]  # (A, G)
        metric = pred_scores[i][:, labels] ** alpha * iou**beta
        cand = metric.topk(min(topk, num_anchors), dim=0).indices  # (k, G)
        cand_metric = metric.gather(0, cand)
        pts = anchor_points[cand]  # (k, G, 2)
        dist = torch.cat([pts - gts[None, :, :2], gts[None, :, 2:] - pts], dim=-1)
        pos = (cand_metric > 0) & (dist.amin(-1) > INSIDE_MARGIN)
        gt_ids = torch.arange(len(gts)).expand_as(cand)
        claimed = torch.full_like(iou, float("-inf"))
        claimed[cand[pos], gt_ids[pos]] = iou[cand[pos], gt_ids[pos]]
        best_iou, best_gt = claimed.max(dim=1)
        assigned = best_iou > float("-inf")
        gt_index[i, assigned] = best_gt[assigned]
        for g in best_gt[assigned].unique():
            mine = (gt_index[i] == g).nonzero().squeeze(1)
            t = metric[mine, g]
            target[i, mine] = t / (t.max() + 1e-7) * iou[mine, g].max()
    return gt_index, target


def make_inputs(num_gts, num_imgs=2, num_classes=80, image_size=(832, 1152), seed=0):
    """Anchors of an 832x1152 image (19953), random GTs of varied size, predicted boxes near their anchors, half
    of those inside a GT shaped like that GT.

    Returns:
        the arguments of ``TaskAlignedAssigner`` and :func:`reference_assign`: scores (B, A, C), predicted boxes
        (B, A, 4), anchor points (A, 2), B GT boxes (G, 4), B GT labels (G,).
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    sizes = [(-(-h // s), -(-w // s)) for s in STRIDES]
    points_per_level = multi_level_points(sizes, STRIDES)
    points = torch.cat(points_per_level)
    priors = torch.cat([level_boxes(p, s) for p, s in zip(points_per_level, STRIDES)])
    num_anchors = len(points)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    gt_boxes, gt_labels, pred_boxes = [], [], []
    for _ in range(num_imgs):
        side = torch.exp(rand(num_gts, 1) * (torch.log(torch.tensor(400.0 / 8)))) * 8  # 8..400 px, log-uniform
        wh = side * torch.cat([torch.ones(num_gts, 1), 0.5 + 1.5 * rand(num_gts, 1)], 1)  # aspect 0.5..2
        ctr = rand(num_gts, 2) * torch.tensor([w, h])
        gts = torch.cat([ctr - wh / 2, ctr + wh / 2], 1).clamp(min=0)
        gts = torch.min(gts, torch.tensor([w, h, w, h], dtype=torch.float32))
        gt_boxes.append(gts)
        gt_labels.append(torch.randint(num_classes, (num_gts,), generator=gen))

        # Prior-like boxes jittered around each anchor...
        prior_wh = (priors[:, 2:] - priors[:, :2]) * torch.exp(0.3 * torch.randn(num_anchors, 2, generator=gen))
        jitter = (rand(num_anchors, 2) - 0.5) * (priors[:, 2:] - priors[:, :2]) / 8
        boxes = torch.cat([points + jitter - prior_wh / 2, points + jitter + prior_wh / 2], 1)
        # ...and half of the anchors inside a GT predict a box close to that GT.
        if num_gts:
            inside = (points[:, None] > gts[None, :, :2]).all(-1) & (points[:, None] < gts[None, :, 2:]).all(-1)
            has_gt, first_gt = inside.any(1), inside.float().argmax(1)
            take = has_gt & (rand(num_anchors) < 0.5)
            gt_like = gts[first_gt[take]]
            gt_wh = (gt_like[:, 2:] - gt_like[:, :2]).repeat(1, 2)
            boxes[take] = gt_like + 0.1 * gt_wh * torch.randn(int(take.sum()), 4, generator=gen)
        pred_boxes.append(boxes)
    scores = rand(num_imgs, num_anchors, num_classes)
    return scores, torch.stack(pred_boxes), points, gt_boxes, gt_labels


def assigner_table(num_gts_list: Sequence[int], repeats: int, full: bool = True) -> str:
    """Markdown table of ``TaskAlignedAssigner`` (top-13, alpha 1, beta 6) and :func:`reference_assign` on
    :func:`make_inputs` (batch 2, 80 classes) for each GT count: the median milliseconds of ``repeats`` calls
    after a warm-up call, and the speed-up; with ``full``, also each one's extra peak MB, the positives, and
    whether both assign alike (same GT per anchor, targets within 1e-5). A title line first."""
    assigner = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)
    threads = torch.get_num_threads()
    columns = ["anchors", "GTs", "ours ms", "ours MB", "reference ms", "reference MB", "speed-up", "positives"]
    columns = columns + ["identical"] if full else ["anchors", "GTs", "ours ms", "reference ms", "speed-up"]
    lines = [
        f"TaskAlignedAssigner vs the per-image reference: CPU ({threads} threads), batch 2, 80 classes, top-13, "
        f"median of {repeats} after a warm-up call, memory budget {assigner.memory_budget_mb:.0f} MB",
        "",
        f"| {' | '.join(columns)} |",
        f"|{'|'.join('---' if c == 'identical' else '---:' for c in columns)}|",
    ]
    for num_gts in num_gts_list:
        inputs = make_inputs(num_gts)
        ours, (ref_index, ref_target) = assigner(*inputs), reference_assign(*inputs)  # also the warm-up
        seconds = median_times(
            {"ours": lambda: assigner(*inputs), "reference": lambda: reference_assign(*inputs)},  # noqa: B023
            repeats,
        )
        row = {
            "anchors": inputs[0].shape[1],
            "GTs": num_gts,
            "ours ms": f"{1000 * seconds['ours']:.1f}",
            "reference ms": f"{1000 * seconds['reference']:.1f}",
            "speed-up": f"{seconds['reference'] / seconds['ours']:.1f}x",
        }
        if full:
            same = torch.equal(ours.gt_index, ref_index) and torch.allclose(
                ours.alignment_target, ref_target, rtol=1e-5, atol=0
            )
            row.update(
                {
                    "ours MB": f"{heap_peak_mb(assigner, *inputs, num_threads=threads):.1f}",
                    "reference MB": f"{heap_peak_mb(reference_assign, *inputs, num_threads=threads):.1f}",
                    "positives": int((ref_index >= 0).sum()),
                    "identical": "yes" if same else "no",
                }
            )
        lines.append(f"| {' | '.join(str(row[c]) for c in columns)} |")
    return "\n".join(lines)
