"""The TOOD meta-architecture end to end on CPU: both variants train a step in both phases and run inference."""

import copy

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tests.conftest import REPO_ROOT, FloatOutputs

NUM_CLASSES = 5


def small_tood(anchor_type="anchor_free", tal_start_iter=10):
    """R-50 TOOD from the common model config, with a narrower head so a CPU step takes about a second."""
    cfg = LazyConfig.load(str(REPO_ROOT / "configs/common/models/tood.py"))
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.tal_start_iter = tal_start_iter
    cfg.model.head.feat_channels = 64
    cfg.model.head.stacked_convs = 3
    cfg.model.head.anchor_type = anchor_type
    # Trainable norms: a randomly initialised FrozenBN backbone produces huge activations.
    cfg.model.backbone.bottom_up.stem.norm = "BN"
    cfg.model.backbone.bottom_up.stages.norm = "BN"
    cfg.model.backbone.bottom_up.stages.depth = 18
    cfg.model.backbone.bottom_up.stages.pop("stride_in_1x1")
    cfg.model.backbone.in_features = ["res3", "res4", "res5"]
    cfg.model.backbone.out_channels = 64
    cfg.model.backbone.top_block.in_channels = 64
    cfg.model.backbone.top_block.out_channels = 64
    cfg.model.head.input_shape = [ShapeSpec(channels=64)] * 5
    return instantiate(cfg.model)


def make_inputs(num_boxes=(3, 0, 1), size=(160, 192)):
    g = torch.Generator().manual_seed(0)
    inputs = []
    for n in num_boxes:
        h, w = size
        image = torch.randint(0, 255, (3, h, w), generator=g).float()
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 16 + torch.rand(n, 2, generator=g) * 48
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        inputs.append({"image": image, "instances": inst, "height": h * 2, "width": w * 2})
    return inputs


@pytest.mark.parametrize("anchor_type", ["anchor_free", "anchor_based"])
@pytest.mark.parametrize("iteration", [0, 10], ids=["atss_warmup", "task_aligned"])
def test_training_step_both_phases(anchor_type, iteration):
    model = small_tood(anchor_type, tal_start_iter=10)
    model.train()
    with EventStorage(iteration):
        losses = model(make_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_batch_without_any_object_trains():
    model = small_tood()
    model.train()
    with EventStorage(20):
        losses = model(make_inputs(num_boxes=(0, 0)))
    assert all(torch.isfinite(v) for v in losses.values())
    # No positives: box loss is exactly zero but still part of the graph.
    assert losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.parametrize("anchor_type", ["anchor_free", "anchor_based"])
def test_inference_output_format(anchor_type):
    model = small_tood(anchor_type)
    model.eval()
    model.test_score_thresh = 0.0  # random weights: make sure detections exist
    inputs = make_inputs(num_boxes=(0, 0))
    with torch.no_grad():
        outputs = model(inputs)
    assert len(outputs) == 2
    for out, inp in zip(outputs, inputs):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"])
        assert 0 < len(inst) <= model.max_detections_per_image
        boxes = inst.pred_boxes.tensor
        # Rescaled to the requested output size and clipped to it.
        assert (boxes[:, 0::2] <= inp["width"]).all() and (boxes[:, 1::2] <= inp["height"]).all()
        assert (boxes >= 0).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()


def test_inference_thresholds_are_configurable():
    model = small_tood()
    model.eval()
    model.test_score_thresh = 0.0
    model.max_detections_per_image = 7
    with torch.no_grad():
        out = model(make_inputs(num_boxes=(0,)))[0]["instances"]
    assert len(out) == 7
    model.test_score_thresh = 1.0
    with torch.no_grad():
        out = model(make_inputs(num_boxes=(0,)))[0]["instances"]
    assert len(out) == 0


def test_phase_follows_iteration_and_is_logged(caplog):
    model = small_tood(tal_start_iter=5)
    model.train()
    calls = []
    original = model.criterion.__class__.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs["warmup"])
        return original(self, *args, **kwargs)

    model.criterion.__class__.__call__ = spy
    try:
        with caplog.at_level("INFO", logger="tood.meta_arch"):
            for it in (0, 4, 5, 9):
                with EventStorage(it):
                    model(make_inputs(num_boxes=(1,)))
    finally:
        model.criterion.__class__.__call__ = original
    assert calls == [True, True, False, False]
    assert "task-aligned" in caplog.text and "ATSS warm-up" in caplog.text


def test_model_is_deepcopyable_and_deterministic_in_eval():
    """A deep copy (Detectron2's EMA and SWA hooks, evaluators of a frozen model) predicts what the model predicts and
    shares nothing with it: changing the copy's weights changes its detections, not the original's. Inference
    repeated on the same input gives the same detections."""
    model = small_tood()
    model.test_score_thresh = 0.0  # random weights: keep every candidate, so that there are detections to compare
    model.eval()
    clone = copy.deepcopy(model)
    inputs = make_inputs(num_boxes=(0,))

    def detect(m):
        with torch.no_grad():
            instances = m(inputs)[0]["instances"]
        return torch.cat([instances.pred_boxes.tensor, instances.scores[:, None]], dim=1)

    before = detect(model)
    assert len(before) > 0
    assert torch.equal(detect(model), before)
    assert torch.equal(detect(clone), before)
    with torch.no_grad():
        for p in clone.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for b in clone.buffers():
            if b.is_floating_point():
                b.mul_(1.5)
    assert not torch.equal(detect(clone), before)
    assert torch.equal(detect(model), before)


@pytest.mark.parametrize("iteration", [0, 10], ids=["atss_warmup", "task_aligned"])
def test_a_float64_model_computes_in_float64(iteration):
    """With ``model.double()``, every floating tensor of the forward pass, the assignment, the losses and the
    backward pass is float64: no step of the head, priors, assigners, targets or losses falls back to float32."""
    model = small_tood(tal_start_iter=10).double()
    model.train()
    inputs = make_inputs(num_boxes=(3, 0, 1))
    with EventStorage(iteration), FloatOutputs() as record:
        losses = model(inputs)
        sum(losses.values()).backward()
    assert {v.dtype for v in losses.values()} == {torch.float64}
    assert dict(record.ops).keys() == {torch.float64}, {k: sorted(v) for k, v in record.ops.items()}
    assert all(p.grad.dtype == torch.float64 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("iteration", [0, 10], ids=["atss_warmup", "task_aligned"])
def test_bfloat16_autocast_keeps_boxes_and_losses_in_float32(iteration):
    """Under CPU autocast the convolutions run in bfloat16, while the head's outputs (scores and boxes), the priors
    and the losses stay float32."""
    model = small_tood(tal_start_iter=10)
    model.train()
    with EventStorage(iteration), FloatOutputs() as record, torch.autocast("cpu", dtype=torch.bfloat16):
        images = model.preprocess_image(make_inputs())
        predictions = model.head([model.backbone(images.tensor)[f] for f in model.head_in_features])
        losses = model(make_inputs())
    assert torch.bfloat16 in record.ops and "aten.convolution" in record.ops[torch.bfloat16]
    assert {x.dtype for level in predictions for x in level} == {torch.float32}
    assert {v.dtype for v in losses.values()} == {torch.float32}
