"""tood.alignment: the metrics on hand-made predictions whose answers are known by construction, and the TOOD /
RetinaNet / FCOS adapters against each model's own inference (random-weight models)."""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

from tests.conftest import REPO_ROOT
from tood.alignment import (
    AlignmentEvaluator,
    DensePredictions,
    dense_predictions,
    nms_misranks,
    object_alignment,
    object_maps,
)
from tood.meta_arch import TOOD

# Tiny random-weight models on the quick start's half-width ResNet-18 + 64-channel FPN, 128 px test images.
CONFIG = """
from detectron2 import model_zoo
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

_quick = LazyConfig.load({quickstart!r})
dataloader, train = _quick.dataloader, _quick.train
dataloader.test.dataset.names = {dataset!r}
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 128
train.device = "cpu"
if {arch!r} == "TOOD":
    model = _quick.model
else:
    model = model_zoo.get_config("common/models/{arch_lower}.py").model
    model.backbone = _quick.model.backbone
    model.head.input_shape = [ShapeSpec(channels=64)] * 5
    model.head.conv_dims = [32]
    model.pixel_mean, model.pixel_std = _quick.model.pixel_mean, _quick.model.pixel_std
    if {arch!r} == "FCOS":
        # detectron2 0.6 probes the norm with get_norm(norm, 1): GroupNorm(32, 1) fails on this torch.
        model.head.norm = ""
model.num_classes = 6
# Random weights score about 0.01: keep every prediction in NMS.
model.test_score_thresh = 0.0
"""
ARCHS = ("TOOD", "RetinaNet", "FCOS")


def write_config(folder, arch, dataset="alignment_tiny"):
    path = folder / f"{arch.lower()}.py"
    path.write_text(
        CONFIG.format(
            quickstart=str(REPO_ROOT / "configs/quickstart_shapes.py"),
            dataset=dataset,
            arch=arch,
            arch_lower=arch.lower(),
        )
    )
    return str(path)


def tiny_model(tmp_path, arch):
    return instantiate(LazyConfig.load(write_config(tmp_path, arch)).model).eval()


def shifted_boxes(shifts, size=100.0):
    """Boxes (S, 4) of ``size`` shifted right by ``shifts``: IoU with [0, 0, size, size] is (size - s) / (size + s)."""
    shifts = torch.as_tensor(shifts, dtype=torch.float32)
    zeros = torch.zeros_like(shifts)
    return torch.stack([shifts, zeros, shifts + size, zeros + size], dim=1)


def shifted_iou(shifts, size=100.0):
    shifts = torch.as_tensor(shifts, dtype=torch.float32)
    return (size - shifts) / (size + shifts)


def dense(scores, boxes, level_sizes=None, anchors_per_cell=1):
    level_sizes = level_sizes or [(1, len(boxes) // anchors_per_cell)]
    return DensePredictions(
        scores=scores,
        boxes=boxes,
        level_sizes=level_sizes,
        strides=[8 * 2**i for i in range(len(level_sizes))],
        anchors_per_cell=anchors_per_cell,
        cell_offset=0.0,
        image_size=(200, 200),
    )


# --- the metrics on constructed cases ---------------------------------------------------------------------


def test_object_alignment_known_cases():
    ious = torch.tensor([0.8, 0.6, 0.4, 0.2])
    # Score a linear function of IoU: correlation exactly 1, the top score is the top IoU.
    aligned = object_alignment(0.5 * ious + 0.1, ious)
    assert aligned.pcc == pytest.approx(1.0)
    assert aligned.top1_agrees and aligned.top1_iou == pytest.approx(0.8)
    assert aligned.num_candidates == 4
    # Reversed ranking: correlation -1, the top score has the lowest IoU.
    reversed_ = object_alignment(1.0 - ious, ious)
    assert reversed_.pcc == pytest.approx(-1.0)
    assert not reversed_.top1_agrees and reversed_.top1_iou == pytest.approx(0.2)
    # Undefined correlation: one candidate, or a constant score; top-1 still defined.
    single = object_alignment(torch.tensor([0.3]), torch.tensor([0.5]))
    assert single.pcc is None and single.top1_agrees and single.top1_iou == pytest.approx(0.5)
    assert object_alignment(torch.full((4,), 0.3), ious).pcc is None
    # An IoU tie at the top counts as agreement.
    assert object_alignment(torch.tensor([0.9, 0.1]), torch.tensor([0.7, 0.7])).top1_agrees
    empty = object_alignment(torch.zeros(0), torch.zeros(0))
    assert (empty.num_candidates, empty.pcc, empty.top1_agrees, empty.top1_iou) == (0, None, None, None)


def test_evaluator_candidates_and_aggregation():
    """Object 0: score = IoU (aligned); object 1, of another class: score = 1 - IoU (reversed).

    Distractors that must not count: a box far away (IoU 0) with the top score, a box barely touching the object
    (IoU < 0.1) with a high score, and high scores of a class that is not the object's.
    """
    shifts = [0.0, 10.0, 20.0, 30.0]
    iou = shifted_iou(shifts)
    near = shifted_boxes(shifts)
    far = torch.tensor([[500.0, 500.0, 600.0, 600.0]])
    touching = shifted_boxes([85.0])  # IoU 15 / 185 < 0.1
    offset = torch.tensor([0.0, 300.0, 0.0, 300.0])  # object 1 is object 0 moved down by 300 px
    boxes = torch.cat([near, near + offset, far, touching])
    scores = torch.zeros(len(boxes), 3)
    scores[:4, 0] = iou
    scores[4:8, 1] = 1.0 - iou
    scores[8, :2] = 1.0
    scores[9, :2] = 0.95
    scores[:8, 2] = 0.99
    gt_boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 300.0, 100.0, 400.0]])
    evaluator = AlignmentEvaluator(nms_thresh=0.6, score_thresh=0.05)
    per_object = evaluator.process(dense(scores, boxes), gt_boxes, torch.tensor([0, 1]))
    assert [o.num_candidates for o in per_object] == [4, 4]
    assert per_object[0].pcc == pytest.approx(1.0) and per_object[1].pcc == pytest.approx(-1.0)
    metrics = evaluator.evaluate()
    assert metrics["pcc"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["top1_agreement"] == 0.5
    assert metrics["top1_iou"] == pytest.approx((1.0 + float(iou[-1])) / 2)
    assert (metrics["num_images"], metrics["num_objects"], metrics["pcc_objects"]) == (1, 2, 2)
    ious, sampled_scores = evaluator.scatter_points()
    assert sorted(ious.tolist()) == pytest.approx(sorted(iou.tolist() * 2))
    assert sorted(sampled_scores.tolist()) == pytest.approx(sorted(iou.tolist() + (1.0 - iou).tolist()))

    # A second image with an object nothing overlaps: counted, but in no average.
    evaluator.process(dense(scores, boxes), torch.tensor([[900.0, 900.0, 950.0, 950.0]]), torch.tensor([0]))
    metrics = evaluator.evaluate()
    assert (metrics["num_images"], metrics["num_objects"], metrics["objects_with_candidates"]) == (2, 3, 2)
    assert metrics["top1_agreement"] == 0.5


def _misranks(boxes, box_scores, gt_boxes, gt_classes=None, box_classes=None, score_thresh=0.05):
    """nms_misranks on one score per box, in class ``box_classes`` (default 0), 2 classes."""
    box_classes = torch.zeros(len(boxes), dtype=torch.long) if box_classes is None else torch.tensor(box_classes)
    scores = torch.zeros(len(boxes), 2)
    scores[torch.arange(len(boxes)), box_classes] = torch.tensor(box_scores)
    gt_classes = torch.zeros(len(gt_boxes), dtype=torch.long) if gt_classes is None else torch.tensor(gt_classes)
    return nms_misranks(scores, boxes, gt_boxes, gt_classes, nms_thresh=0.6, score_thresh=score_thresh)


def test_nms_misrank_known_cases():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoU with the object: 1.0 and 95/105; with each other 95/105 > 0.6.
    pair = shifted_boxes([0.0, 5.0])
    # The worse-localised box scores higher: NMS keeps it and suppresses the better one.
    assert _misranks(pair, [0.5, 0.9], gt) == (1, 1)
    assert _misranks(pair, [0.9, 0.5], gt) == (1, 0)
    # Below the score threshold a box takes no part in NMS; a box of another class is never suppressed.
    assert _misranks(pair, [0.01, 0.9], gt) == (0, 0)
    assert _misranks(pair, [0.5, 0.9], gt, box_classes=[1, 0]) == (0, 0)
    # One kept box suppressing a worse and a better box counts once, as misranked.
    assert _misranks(shifted_boxes([0.0, 5.0, 10.0]), [0.5, 0.9, 0.4], gt) == (1, 1)
    # The suppressed box matches another object of the class (its IoU 1 there): not the kept box's object.
    two_objects = torch.tensor([[0.0, 0.0, 100.0, 100.0], [10.0, 0.0, 110.0, 100.0]])
    assert _misranks(shifted_boxes([0.0, 10.0]), [0.9, 0.5], two_objects) == (0, 0)
    # Chain A > B > C in score, A-B and B-C overlap > 0.6, A-C does not: A suppresses B, C is kept. B is worse
    # than A (no misrank); crediting the suppression to C, whose IoU is below B's, would count a misrank.
    chain = shifted_boxes([0.0, 20.0, 40.0])
    assert _misranks(chain, [0.9, 0.8, 0.7], gt) == (1, 0)
    # No objects: nothing to count.
    assert _misranks(pair, [0.5, 0.9], torch.zeros(0, 4)) == (0, 0)


def test_object_maps_level_and_anchor_choice():
    """Two levels (2x2 stride 8, 1x2 stride 16), two anchors per cell; the best candidate lies on level 1."""
    gt_box = torch.tensor([0.0, 0.0, 100.0, 100.0])
    # Level 0: 8 predictions, all IoU 95/105 with low scores; level 1: 4, IoU (100-s)/(100+s).
    shifts = torch.tensor([0.0, 40.0, 10.0, 20.0])
    boxes = torch.cat([shifted_boxes([5.0] * 8), shifted_boxes(shifts)])
    scores = torch.zeros(12, 2)
    scores[:8, 1] = torch.linspace(0.1, 0.2, 8)
    scores[8:, 1] = torch.tensor([0.3, 0.9, 0.6, 0.5])  # cell 0: anchor 1 wins; cell 1: anchor 0 wins
    maps = object_maps(dense(scores, boxes, [(2, 2), (1, 2)], anchors_per_cell=2), gt_box, 1)
    assert (maps.level, maps.stride) == (1, 16)
    torch.testing.assert_close(maps.score, torch.tensor([[0.9, 0.6]]))
    torch.testing.assert_close(maps.iou, shifted_iou([40.0, 10.0])[None])
    # No candidate of the object at all.
    assert object_maps(dense(scores, boxes, [(2, 2), (1, 2)], 2), torch.tensor([500.0, 500.0, 600.0, 600.0]), 1) is None


# --- adapters on tiny random-weight models ----------------------------------------------------------------


def _images():
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, h, w), generator=g).float()} for h, w in ((64, 96), (80, 64))]


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_matches_model_inference(tmp_path, arch):
    """With no threshold, no top-k and no suppression, the model's own detections are exactly the dense
    (location, class) pairs: same scores and boxes, one to one."""
    model = tiny_model(tmp_path, arch)
    inputs = _images()
    predictions = dense_predictions(model, inputs)

    anchors_per_cell = 9 if arch == "RetinaNet" else 1
    for p, image_size in zip(predictions, [(64, 96), (80, 64)]):
        # Padded to 96 x 96 (a multiple of 32): levels of strides 8..128.
        assert p.level_sizes == [(12, 12), (6, 6), (3, 3), (2, 2), (1, 1)]
        assert p.strides == [8, 16, 32, 64, 128] and p.anchors_per_cell == anchors_per_cell
        assert p.image_size == image_size
        assert p.scores.shape == (194 * anchors_per_cell, 6) and p.boxes.shape == (194 * anchors_per_cell, 4)
        assert ((p.scores > 0) & (p.scores < 1)).all()

    model.test_score_thresh, model.test_topk_candidates = 0.0, 10**6
    model.test_nms_thresh, model.max_detections_per_image = 1.0, 10**6  # IoU > 1 never happens: nothing suppressed
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        results = model.forward_inference(images, features, model.head(features))
    for p, r in zip(predictions, results):
        assert len(r) == p.scores.numel()
        for k in range(p.scores.shape[1]):
            ours = torch.cat([p.scores[:, k : k + 1], p.boxes], dim=1)
            mine = r.pred_classes == k
            theirs = torch.cat([r.scores[mine, None], r.pred_boxes.tensor[mine]], dim=1)
            distance, match = torch.cdist(theirs.double(), ours.double()).min(dim=1)
            assert distance.max() < 1e-4
            assert len(match.unique()) == len(ours)


def test_adapter_dispatch(tmp_path):
    with pytest.raises(TypeError, match="Linear.*supported: FCOS, RetinaNet, TOOD"):
        dense_predictions(nn.Linear(1, 1), _images())
    model = tiny_model(tmp_path, "TOOD")
    reference = dense_predictions(model, _images()[:1])[0]
    # A subclass uses its parent's adapter.
    model.__class__ = type("MyTOOD", (TOOD,), {})
    assert torch.equal(dense_predictions(model, _images()[:1])[0].scores, reference.scores)
    with pytest.raises(ValueError, match="eval mode"):
        dense_predictions(model.train(), _images()[:1])
