"""Numerics at the extremes: probabilities, offsets, boxes, GIoU, losses and normalisers stay finite."""

import torch

from tood.layers import align_boxes, sigmoid_geometric_mean
from tood.losses import TOODLoss, TOODTargets, focal_loss_prob, giou_loss, quality_focal_loss_prob
from tood.priors import level_boxes, level_points


def test_own_numerics_stay_finite_at_extremes():
    """Random weights and an extreme learning rate give extreme logits, offsets and boxes, and batches without
    objects: the probability product, offset sampling, GIoU, losses and normalisers stay finite (also bfloat16)."""
    big = [-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("inf"), float("-inf")]
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.tensor(big, dtype=dtype).repeat_interleave(len(big)).requires_grad_()
        b = torch.tensor(big, dtype=dtype).repeat(len(big)).requires_grad_()
        p = sigmoid_geometric_mean(a, b)
        p.sum().backward()
        assert ((p >= 0) & (p <= 1)).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()

    boxes = torch.randn(2, 4, 5, 6, requires_grad=True)
    for value in (1e3, 1e9, 1e30, -1e30):
        offsets = torch.full((2, 8, 5, 6), value, requires_grad=True)
        out = align_boxes(boxes, offsets)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(offsets.grad).all() and torch.isfinite(boxes.grad).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(align_boxes(boxes, offsets.detach().bfloat16())).all()

    # Degenerate, crossed, disjoint and huge (1e15 strides) predictions against degenerate and normal targets.
    pred = torch.tensor(
        [[0, 0, 0, 0], [5, 5, 1, 1], [3, 3, 3, 3], [100, 100, 200, 200], [-1e15, -1e15, 1e15, 1e15], [0, 0, 2, 2]],
        dtype=torch.float32,
        requires_grad=True,
    )
    target = torch.tensor([[0, 0, 0, 0], [0, 0, 2, 2], [3, 3, 3, 3], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    loss = giou_loss(pred, target.float())
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()

    # Probabilities of exactly 0 and 1 in both classification losses.
    probs = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 3])
    total = focal_loss_prob(probs, labels).sum() + quality_focal_loss_prob(probs, labels, torch.tensor([0.3, 0])).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(probs.grad).all()

    # A batch without objects: normalisers clamp to 1, losses and gradients are finite, in both phases.
    criterion = TOODLoss(num_classes=3)
    points = level_points((4, 4), 8)
    for warmup in (True, False):
        scores = torch.rand(2, 16, 3, requires_grad=True)
        pred = level_boxes(points, 8, 1.0)[None].repeat(2, 1, 1).requires_grad_()
        empty = [torch.zeros(0, 4)] * 2
        args = (scores, pred, level_boxes(points, 8), points, [16], torch.full((16,), 8.0), empty)
        losses = criterion(*args, [torch.zeros(0, dtype=torch.long)] * 2, warmup=warmup)
        sum(losses.values()).backward()
        assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_cls"]) and torch.isfinite(scores.grad).all()
    norms = criterion.normalizers(TOODTargets(*[torch.zeros(2, 16)] * 5))
    assert [n.item() for n in norms] == [1.0, 1.0]


def test_giou_of_boxes_beyond_float32_area_range():
    pred = torch.tensor([[-1e20, -1e20, 1e20, 1e20]])
    assert torch.isfinite(giou_loss(pred, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))).all()


def test_decoded_boxes_stay_finite_for_large_regression_outputs():
    from detectron2.layers import ShapeSpec

    from tood.head import TOODHead

    head = TOODHead(input_shape=[ShapeSpec(channels=32)], num_classes=2, feat_channels=32, stacked_convs=1, strides=[8])
    boxes = head._decode_boxes(torch.full((1, 4, 2, 2), 100.0), head.scales[0], 8)
    assert torch.isfinite(boxes).all()
