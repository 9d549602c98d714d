"""TOOD losses and criterion: parity with mmdetection 3.3's TOOD head (targets, per-level losses, gradients), and
behaviour on edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import tood.losses as losses_module
from tood.losses import TOODLoss, focal_loss_prob, giou_loss, quality_focal_loss_prob

pytestmark = pytest.mark.reference_threads  # compares with tensors recorded from mmdetection

PHASES = [("epoch0", True), ("epoch4", False)]


def _flatten(per_level):
    """Per-level (N, C, H, W) -> (N, A, C): levels concatenated, each row-major over (y, x)."""
    return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]) for t in per_level], dim=1)


def _max_rel(ours, ref):
    return ((ours - ref).abs() / ref.abs()).max().item()


def _oracle_setup(oracle):
    priors = torch.cat(oracle["priors"])
    num_per_level = [len(p) for p in oracle["priors"]]
    strides = torch.cat([torch.full((n,), float(s)) for n, s in zip(num_per_level, oracle["meta"]["strides"])])
    return dict(
        prior_boxes=priors,
        prior_points=(priors[:, :2] + priors[:, 2:]) / 2,
        num_anchors_per_level=num_per_level,
        strides_per_anchor=strides,
        gt_boxes=oracle["inputs"]["gt_bboxes"],
        gt_labels=oracle["inputs"]["gt_labels"],
    )


@pytest.mark.parametrize("phase, warmup", PHASES)
def test_targets_match_mmdet(head_oracle, phase, warmup):
    ref = head_oracle["loss"][phase]["targets"]
    setup = _oracle_setup(head_oracle)
    del setup["strides_per_anchor"]
    targets = TOODLoss(num_classes=80).get_targets(
        ref["flat_cls_scores"], ref["flat_bbox_preds_px"], warmup=warmup, **setup
    )
    assert torch.equal(targets.labels, ref["labels"])
    # No image of the oracle's batch is padded beyond its own size: every anchor is valid, weight 1.
    assert torch.equal(targets.label_weights, ref["label_weights"])
    assert torch.equal(targets.bbox_targets, ref["bbox_targets"])
    pos = ref["labels"] < 80
    dev = _max_rel(targets.alignment_metrics[pos], ref["alignment_metrics"][pos])
    print(f"{phase}: {int(pos.sum())} positives, alignment_metrics max rel dev {dev:.2e}")
    assert dev <= 1e-5 and (targets.alignment_metrics[~pos] == 0).all() and (ref["alignment_metrics"][~pos] == 0).all()
    if warmup:
        assert (targets.alignment_metrics[pos] == 1).all()
    else:
        assert torch.equal(targets.bbox_weights, targets.alignment_metrics)


@pytest.mark.parametrize("phase, warmup", PHASES)
def test_losses_and_gradients_match_mmdet(head_oracle, phase, warmup):
    ref = head_oracle["loss"][phase]
    setup = _oracle_setup(head_oracle)
    cls_scores = _flatten(head_oracle["outputs"]["cls_scores"]).requires_grad_()
    bbox_stride_units = _flatten(head_oracle["outputs"]["bbox_preds"]).requires_grad_()
    bbox_preds = bbox_stride_units * setup["strides_per_anchor"][:, None]  # as the meta-architecture does
    assert torch.equal(cls_scores, ref["targets"]["flat_cls_scores"])
    assert torch.equal(bbox_preds, ref["targets"]["flat_bbox_preds_px"])

    criterion = TOODLoss(num_classes=80)
    targets = criterion.get_targets(
        cls_scores,
        bbox_preds,
        setup["prior_boxes"],
        setup["prior_points"],
        setup["num_anchors_per_level"],
        setup["gt_boxes"],
        setup["gt_labels"],
        warmup,
    )
    cls_losses, box_losses = criterion.anchor_losses(
        cls_scores, bbox_preds, setup["strides_per_anchor"], targets, warmup
    )
    cls_norm, box_norm = criterion.normalizers(targets)
    devs = {}
    for level, (cls_level, box_level) in enumerate(
        zip(cls_losses.split(setup["num_anchors_per_level"], 1), box_losses.split(setup["num_anchors_per_level"], 1))
    ):
        for name, ours, theirs in [
            ("loss_cls", cls_level.sum() / cls_norm, ref["loss_cls"][level]),
            ("loss_bbox", box_level.sum() / box_norm, ref["loss_bbox"][level]),
        ]:
            if theirs == 0:  # no positive on this level
                assert ours == 0
            else:
                devs[f"{name}[{level}]"] = _max_rel(ours, theirs)

    losses = criterion(cls_scores, bbox_preds, warmup=warmup, **setup)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    total = losses["loss_cls"] + losses["loss_box_reg"]
    devs["loss_cls_sum"] = _max_rel(losses["loss_cls"], ref["loss_cls_sum"])
    devs["loss_bbox_sum"] = _max_rel(losses["loss_box_reg"], ref["loss_bbox_sum"])
    devs["total"] = _max_rel(total, ref["total"])

    total.backward()
    for name, grad, theirs in [
        ("grad_cls_scores", cls_scores.grad, _flatten(ref["grad_cls_scores"])),
        ("grad_bbox_preds", bbox_stride_units.grad, _flatten(ref["grad_bbox_preds"])),
    ]:
        assert torch.equal(grad == 0, theirs == 0), name
        nonzero = theirs != 0
        devs[name] = _max_rel(grad[nonzero], theirs[nonzero])  # element-wise
    print(f"{phase}: " + ", ".join(f"{k} {v:.1e}" for k, v in devs.items()))
    assert max(devs.values()) <= 1e-5


def _small_problem(num_gts=(2, 0), num_classes=4, dtype=torch.float32):
    """A few anchors on a 64x64 image, one level of stride 8, with predicted boxes around each anchor."""
    gen = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(8.0) * 8, torch.arange(8.0) * 8, indexing="ij")
    points = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    priors = torch.cat([points - 32, points + 32], 1)
    n = len(num_gts)
    boxes = torch.cat([points - 12, points + 12], 1).expand(n, -1, -1) + torch.rand(n, 64, 4, generator=gen)
    scores = torch.rand(n, 64, num_classes, generator=gen).clamp(0.01, 0.99)
    gt_pool = torch.tensor([[4.0, 6.0, 40.0, 44.0], [20.0, 18.0, 60.0, 50.0], [10.0, 30.0, 30.0, 60.0]])
    gt_boxes = [gt_pool[:k] for k in num_gts]
    gt_labels = [torch.arange(k) % num_classes for k in num_gts]
    kwargs = dict(
        prior_boxes=priors,
        prior_points=points,
        num_anchors_per_level=[64],
        strides_per_anchor=torch.full((64,), 8.0),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
    )
    return scores.to(dtype).requires_grad_(), boxes.to(dtype).requires_grad_(), kwargs


def _target_kwargs(kwargs):
    return {k: v for k, v in kwargs.items() if k != "strides_per_anchor"}


@pytest.mark.parametrize("warmup", [True, False])
def test_no_ground_truth_gives_finite_losses_and_unit_normalisers(warmup):
    scores, boxes, kwargs = _small_problem(num_gts=(0, 0))
    criterion = TOODLoss(num_classes=4)
    targets = criterion.get_targets(scores, boxes, warmup=warmup, **_target_kwargs(kwargs))
    assert (targets.labels == 4).all() and (targets.alignment_metrics == 0).all()
    assert [n.item() for n in criterion.normalizers(targets)] == [1.0, 1.0]
    losses = criterion(scores, boxes, warmup=warmup, **kwargs)
    assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    # The regression branch stays in the graph (DDP needs a gradient for every parameter).
    assert boxes.grad is not None and (boxes.grad == 0).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("warmup", [True, False])
def test_single_gt_degenerate_gt_and_degenerate_predictions(warmup):
    scores, boxes, kwargs = _small_problem(num_gts=(1, 0))
    kwargs["gt_boxes"][0] = torch.cat([kwargs["gt_boxes"][0], torch.tensor([[30.0, 20.0, 30.0, 50.0]])])  # zero width
    kwargs["gt_labels"][0] = torch.tensor([0, 1])
    with torch.no_grad():
        boxes[0, 10:14] = torch.tensor([16.0, 16.0, 16.0, 30.0])  # zero-width predictions inside the GT
    criterion = TOODLoss(num_classes=4)
    targets = criterion.get_targets(scores, boxes, warmup=warmup, **_target_kwargs(kwargs))
    pos = targets.labels < 4
    assert pos.any() and (targets.labels[pos] == 0).all()  # only the real GT gets positives
    losses = criterion(scores, boxes, warmup=warmup, **kwargs)
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()
    for t in (losses["loss_cls"], losses["loss_box_reg"], scores.grad, boxes.grad):
        assert torch.isfinite(t).all()
    assert losses["loss_box_reg"] > 0


@pytest.mark.parametrize("warmup", [True, False])
def test_bf16_autocast_gives_float32_losses(warmup):
    scores, boxes, kwargs = _small_problem(num_gts=(3, 1))
    reference = TOODLoss(num_classes=4)(scores, boxes, warmup=warmup, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = TOODLoss(num_classes=4)(scores.bfloat16(), boxes.bfloat16(), warmup=warmup, **kwargs)
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert abs(value.item() - reference[name].item()) < 0.05 * reference[name].item()  # bf16 inputs only


def test_normalisers_are_averaged_over_ranks(monkeypatch):
    """mmdet's reduce_mean: each rank's sum divided by the world size, summed over ranks, then clamped to >= 1."""
    scores, boxes, kwargs = _small_problem(num_gts=(2, 1))
    criterion = TOODLoss(num_classes=4)
    targets = criterion.get_targets(scores, boxes, warmup=True, **_target_kwargs(kwargs))
    local = [n.item() for n in criterion.normalizers(targets)]
    other_rank = torch.tensor(3.0)  # what the other rank contributes, before the division

    def fake_all_reduce(t):
        t.add_(other_rank / 2)

    monkeypatch.setattr(losses_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(losses_module.dist, "all_reduce", fake_all_reduce)
    reduced = [n.item() for n in criterion.normalizers(targets)]
    for mine, theirs in zip(local, reduced):
        assert theirs == pytest.approx(max(1.0, (mine + 3.0) / 2))


def test_focal_loss_equals_torchvision_on_logits():
    logits = torch.randn(50, 6, dtype=torch.float64)
    labels = torch.randint(7, (50,))  # 6 = background
    ours = focal_loss_prob(logits.sigmoid(), labels)
    one_hot = F.one_hot(labels, 7)[:, :6].double()
    theirs = torchvision.ops.sigmoid_focal_loss(logits, one_hot, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_quality_focal_loss_formula():
    probs = torch.tensor([[0.2, 0.7], [0.4, 0.1]])
    labels = torch.tensor([1, 2])  # second row: background
    quality = torch.tensor([0.9, 0.5])
    loss = quality_focal_loss_prob(probs, labels, quality, beta=2.0)
    expected = [
        [0.2**2 * -math.log(0.8), 0.2**2 * -(0.9 * math.log(0.7) + 0.1 * math.log(0.3))],
        [0.4**2 * -math.log(0.6), 0.1**2 * -math.log(0.9)],
    ]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_giou_loss():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    target = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    # identical: 0; disjoint 10x10 boxes 10 apart: IoU 0, enclosing 300, union 200 -> 1 + 1/3; points: no NaN.
    torch.testing.assert_close(giou_loss(pred, target), torch.tensor([0.0, 4.0 / 3.0, 1.0]))
    # Away from the eps clamps it is the usual GIoU loss.
    a, b = torch.rand(100, 4).sort(1).values * 50, torch.rand(100, 4).sort(1).values * 50  # x1<=y1<=x2<=y2
    torch.testing.assert_close(giou_loss(a, b), torchvision.ops.generalized_box_iou_loss(a, b), rtol=1e-5, atol=1e-5)
