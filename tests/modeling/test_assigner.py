"""ATSS and task-aligned assignment: parity with mmdetection 3.3's assigners, and behaviour on edge cases."""

import pytest
import torch

from tood.assigner import INSIDE_MARGIN, ATSSAssigner, TaskAlignedAssigner, paired_box_iou
from tood.priors import level_boxes, multi_level_points

pytestmark = pytest.mark.reference_threads  # compares with tensors recorded from mmdetection

STRIDES = (8, 16, 32, 64, 128)


def _rel_dev(ours, ref):
    return ((ours - ref).abs() / ref.abs().clamp(min=1e-12)).max().item() if ref.numel() else 0.0


def _oracle_assign_inputs(oracle):
    """What ``assign.inputs`` says mmdet's assigners were fed: concatenated priors, epoch-4 flattened predictions."""
    assert oracle["assign"]["inputs"].startswith("priors=cat(priors); scores=loss.epoch4.targets.flat_cls_scores[i]")
    priors = torch.cat(oracle["priors"])
    targets = oracle["loss"]["epoch4"]["targets"]
    return (
        priors,
        (priors[:, :2] + priors[:, 2:]) / 2,
        [len(p) for p in oracle["priors"]],
        targets["flat_cls_scores"],
        targets["flat_bbox_preds_px"],
        oracle["inputs"]["gt_bboxes"],
        oracle["inputs"]["gt_labels"],
    )


def _check_against_mmdet(name, ref, gt_index, iou, gt_boxes, gt_labels):
    pos = ref["gt_inds"] > 0
    assert torch.equal(gt_index + 1, ref["gt_inds"]), name
    labels = torch.where(gt_index >= 0, gt_labels[gt_index.clamp(min=0)], -1)
    assert torch.equal(labels, ref["labels"]), name
    # mmdet leaves -INF as the "overlap" of negatives; ours reports 0.
    assert (ref["max_overlaps"][~pos] == -1e8).all() and (iou[~pos] == 0).all()
    dev = _rel_dev(iou[pos], ref["max_overlaps"][pos])
    torch.testing.assert_close(gt_boxes[gt_index[pos]], ref["assigned_boxes"][pos], rtol=0, atol=0)
    return dev


def test_atss_matches_mmdet(head_oracle):
    priors, _, num_per_level, _, _, gt_boxes, gt_labels = _oracle_assign_inputs(head_oracle)
    res = ATSSAssigner(topk=9)(priors, num_per_level, gt_boxes)
    for i in range(len(gt_boxes)):
        dev = _check_against_mmdet(
            f"atss[{i}]", head_oracle["assign"]["atss"][i], res.gt_index[i], res.iou[i], gt_boxes[i], gt_labels[i]
        )
        print(f"ATSS image {i}: {int((res.gt_index[i] >= 0).sum())} positives, max_overlaps max rel dev {dev:.2e}")
        assert dev <= 1e-5


def test_tal_matches_mmdet(head_oracle):
    _, points, _, scores, boxes, gt_boxes, gt_labels = _oracle_assign_inputs(head_oracle)
    res = TaskAlignedAssigner(topk=13, alpha=1, beta=6)(scores, boxes, points, gt_boxes, gt_labels)
    for i in range(len(gt_boxes)):
        ref = head_oracle["assign"]["tal"][i]
        iou_dev = _check_against_mmdet(f"tal[{i}]", ref, res.gt_index[i], res.iou[i], gt_boxes[i], gt_labels[i])
        metric_dev = _rel_dev(res.alignment_metric[i], ref["assign_metrics"])
        print(f"TAL image {i}: max_overlaps max rel dev {iou_dev:.2e}, assign_metrics max rel dev {metric_dev:.2e}")
        assert iou_dev <= 1e-5 and metric_dev <= 1e-5


def _dense_reference(scores, boxes, points, gt_boxes, gt_labels, topk, alpha=1.0, beta=6.0):
    """The algorithm as written: full (A, G) metric per image, top-k over anchors, inside test, argmax IoU."""
    num_imgs, num_anchors, _ = scores.shape
    gt_index = torch.full((num_imgs, num_anchors), -1)
    target = torch.zeros(num_imgs, num_anchors)
    for i in range(num_imgs):
        gts = gt_boxes[i]
        if len(gts) == 0:
            continue
        iou = paired_box_iou(boxes[i][:, None], gts[None])[0]
        metric = scores[i][:, gt_labels[i]] ** alpha * iou**beta
        cand = metric.topk(min(topk, num_anchors), dim=0).indices
        pts = points[cand]
        inside = torch.cat([pts - gts[:, :2], gts[:, 2:] - pts], -1).amin(-1) > INSIDE_MARGIN
        pos = (metric.gather(0, cand) > 0) & inside
        cols = torch.arange(len(gts)).expand_as(cand)
        claimed = torch.full_like(iou, -1e8)
        claimed[cand[pos], cols[pos]] = iou[cand[pos], cols[pos]]
        best, arg = claimed.max(1)
        gt_index[i][best > -1e8] = arg[best > -1e8]
        for g in range(len(gts)):
            mine = gt_index[i] == g
            if mine.any():
                t = metric[mine, g]
                target[i, mine] = t / (t.max() + 1e-7) * iou[mine, g].max()
    return gt_index, target


def _random_scene(num_gts, num_imgs=2, size=(256, 320), num_classes=5, seed=0):
    """Anchors of a small image; GTs of varied size; predicted boxes near their anchor, some shaped like a GT."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    per_level = multi_level_points([(-(-h // s), -(-w // s)) for s in STRIDES], STRIDES)
    points = torch.cat(per_level)
    priors = torch.cat([level_boxes(p, s) for p, s in zip(per_level, STRIDES)])
    num_anchors = len(points)
    gt_boxes, gt_labels, boxes = [], [], []
    for n in num_gts if isinstance(num_gts, (list, tuple)) else [num_gts] * num_imgs:
        ctr = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
        wh = 8 + torch.rand(n, 2, generator=gen) * 150
        gt_boxes.append(torch.cat([ctr - wh / 2, ctr + wh / 2], 1))
        gt_labels.append(torch.randint(num_classes, (n,), generator=gen))
        scale = torch.exp(0.4 * torch.randn(num_anchors, 2, generator=gen)) * (priors[:, 2:] - priors[:, :2]) / 2
        b = torch.cat([points - scale, points + scale], 1)
        if n:  # half of the anchors inside a GT predict a box close to it
            inside = ((points[:, None] > gt_boxes[-1][:, :2]) & (points[:, None] < gt_boxes[-1][:, 2:])).all(-1)
            like = inside.any(1) & (torch.rand(num_anchors, generator=gen) < 0.5)
            near = gt_boxes[-1][inside.float().argmax(1)[like]]
            b[like] = near + 0.1 * (near[:, 2:] - near[:, :2]).repeat(1, 2) * torch.randn(len(near), 4, generator=gen)
        boxes.append(b)
    scores = torch.rand(len(boxes), num_anchors, num_classes, generator=gen)
    return scores, torch.stack(boxes), points, priors, gt_boxes, gt_labels


def test_tal_equals_dense_computation():
    scores, boxes, points, _, gt_boxes, gt_labels = _random_scene([12, 30], seed=1)
    for topk in (3, 13):
        res = TaskAlignedAssigner(topk=topk)(scores, boxes, points, gt_boxes, gt_labels)
        ref_index, ref_target = _dense_reference(scores, boxes, points, gt_boxes, gt_labels, topk)
        assert (ref_index >= 0).sum() > 10 * topk  # a meaningful comparison
        assert torch.equal(res.gt_index, ref_index)
        torch.testing.assert_close(res.alignment_target, ref_target, rtol=1e-5, atol=0)


def test_tal_outside_candidate_keeps_its_topk_slot():
    """mmdet takes the top-k before the inside test: a better anchor outside the GT costs an inside one its slot."""
    points = torch.tensor([[50.0, 50.0], [200.0, 50.0]])  # the second lies outside the GT
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    boxes = gt.expand(1, 2, 4).clone()
    scores = torch.tensor([[[0.5], [0.9]]])
    top1 = TaskAlignedAssigner(topk=1)(scores, boxes, points, [gt], [torch.tensor([0])])
    assert (top1.gt_index == -1).all()
    top2 = TaskAlignedAssigner(topk=2)(scores, boxes, points, [gt], [torch.tensor([0])])
    assert top2.gt_index.tolist() == [[0, -1]]


def test_tal_single_gt_targets():
    scores, boxes, points, _, gt_boxes, gt_labels = _random_scene([1], seed=2)
    res = TaskAlignedAssigner(topk=13)(scores, boxes, points, gt_boxes, gt_labels)
    pos = res.gt_index[0] >= 0
    assert 0 < pos.sum() <= 13
    gt = gt_boxes[0][0]
    p = points[pos]
    assert ((p > gt[:2] + INSIDE_MARGIN) & (p < gt[2:] - INSIDE_MARGIN)).all()
    iou = paired_box_iou(boxes[0][pos], gt)[0]
    torch.testing.assert_close(res.iou[0][pos], iou, rtol=0, atol=0)
    torch.testing.assert_close(res.alignment_metric[0][pos], scores[0][pos, gt_labels[0][0]] * iou**6)
    # The best positive gets the best IoU as its target; negatives get nothing.
    t = res.alignment_metric[0][pos]
    torch.testing.assert_close(res.alignment_target[0][pos].max(), iou.max() * t.max() / (t.max() + 1e-7))
    assert (res.alignment_target[0][~pos] == 0).all() and (res.alignment_metric[0][~pos] == 0).all()


def test_tal_anchor_claimed_twice_goes_to_higher_iou():
    points = torch.tensor([[50.0, 50.0]])
    gts = torch.tensor([[0.0, 0.0, 100.0, 100.0], [10.0, 10.0, 90.0, 90.0]])
    boxes = torch.tensor([[[12.0, 12.0, 92.0, 92.0]]])  # closer to the second GT
    res = TaskAlignedAssigner()(torch.ones(1, 1, 2), boxes, points, [gts], [torch.tensor([0, 1])])
    assert res.gt_index.tolist() == [[1]]


def test_tal_images_without_gt_degenerate_and_unreachable_gts():
    scores, boxes, points, _, gt_boxes, gt_labels = _random_scene([6, 6], seed=3)
    degenerate = torch.tensor([[60.0, 40.0, 60.0, 120.0], [30.0, 50.0, 90.0, 50.0], [70.0, 70.0, 70.0, 70.0]])
    unreachable = torch.tensor([[2000.0, 2000.0, 2100.0, 2100.0], [9.0, 9.0, 15.0, 15.0]])  # no anchor centre inside
    gt_boxes = [torch.empty(0, 4), torch.cat([gt_boxes[1], degenerate, unreachable])]
    gt_labels = [torch.empty(0, dtype=torch.long), torch.cat([gt_labels[1], torch.zeros(5, dtype=torch.long)])]
    boxes[1, :40] = degenerate[0]  # zero-area predictions too
    res = TaskAlignedAssigner()(scores, boxes, points, gt_boxes, gt_labels)
    assert (res.gt_index[0] == -1).all() and (res.alignment_target[0] == 0).all()
    assert res.gt_index[1].max() < 6 and (res.gt_index[1] >= 0).any()
    for t in res:
        assert torch.isfinite(t.float()).all()
    empty = TaskAlignedAssigner()(
        scores, boxes, points, [torch.empty(0, 4)] * 2, [torch.empty(0, dtype=torch.long)] * 2
    )
    assert (empty.gt_index == -1).all() and (empty.alignment_target == 0).all()
    far = TaskAlignedAssigner()(scores, boxes, points, [unreachable[:1]] * 2, [torch.tensor([0])] * 2)
    assert (far.gt_index == -1).all()


def test_tal_batched_equals_per_image():
    scores, boxes, points, _, gt_boxes, gt_labels = _random_scene([3, 25, 0], seed=4)
    assigner = TaskAlignedAssigner()
    batched = assigner(scores, boxes, points, gt_boxes, gt_labels)
    for i in range(3):
        single = assigner(scores[i : i + 1], boxes[i : i + 1], points, gt_boxes[i : i + 1], gt_labels[i : i + 1])
        for a, b in zip(batched, single):
            assert torch.equal(a[i], b[0])


def test_tal_many_gts_with_tiny_memory_budget():
    scores, boxes, points, _, gt_boxes, gt_labels = _random_scene([300, 280], seed=5)
    full = TaskAlignedAssigner(memory_budget_mb=1e6)(scores, boxes, points, gt_boxes, gt_labels)
    tiny = TaskAlignedAssigner(memory_budget_mb=0.01)(scores, boxes, points, gt_boxes, gt_labels)  # 1 GT a chunk
    assert (full.gt_index >= 0).sum() > 500
    for a, b in zip(full, tiny):
        assert torch.equal(a, b)


def test_atss_batched_chunked_and_edge_cases():
    _, _, points, priors, gt_boxes, _ = _random_scene([4, 40, 0], seed=6)
    num_per_level = [len(p) for p in multi_level_points([(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)], STRIDES)]
    assert sum(num_per_level) == len(priors)
    gt_boxes[0] = torch.cat([gt_boxes[0], torch.tensor([[60.0, 40.0, 60.0, 120.0], [9.0, 9.0, 15.0, 15.0]])])
    assigner = ATSSAssigner(topk=9)
    batched = assigner(priors, num_per_level, gt_boxes)
    chunked = ATSSAssigner(topk=9, memory_budget_mb=0.01)(priors, num_per_level, gt_boxes)
    for a, b in zip(batched, chunked):
        assert torch.equal(a, b)
    for i in range(3):
        single = assigner(priors, num_per_level, gt_boxes[i : i + 1])
        for a, b in zip(batched, single):
            assert torch.equal(a[i], b[0])
    assert (batched.gt_index[2] == -1).all()
    assert batched.gt_index[0].max() < 4  # the degenerate and the unreachable GT get nothing
    assert (batched.gt_index[1] >= 0).sum() > 40
    # Positives are centred inside their GT, and claimed by their highest-IoU GT among those that selected them.
    pos = batched.gt_index[1] >= 0
    gt = gt_boxes[1][batched.gt_index[1][pos]]
    p = points[pos]
    assert ((p > gt[:, :2] + INSIDE_MARGIN) & (p < gt[:, 2:] - INSIDE_MARGIN)).all()
    torch.testing.assert_close(batched.iou[1][pos], paired_box_iou(priors[pos], gt)[0], rtol=0, atol=0)
