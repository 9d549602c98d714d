"""End-to-end parity with mmdetection 3.3's TOOD R-50 detector (the ``e2e_oracle``, reference tensors recorded from
mmdetection 3.3).

The reference checkpoint is converted by :mod:`tood.conversion` and loaded into the model of configs/tood_R_50_1x.py;
the model then runs on the reference's exact backbone input. Compared stage by stage: backbone C2-C5 (per-channel
statistics), FPN P3-P7, the head's outputs and intermediates, the final detections, and the training losses of both
phases. Tolerances (docs/parity.md): 1e-5 relative for features and scores, 0.01 px for boxes; labels and counts
exactly.
Run with ``-s`` to see the measured deviations.

The full forward at 800x800 takes seconds on a CPU: each module-scoped fixture runs it once.
"""

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import deform_conv2d

from tests.conftest import REFERENCE_THREADS, REPO_ROOT
from tood.conversion import convert_mmdet_checkpoint
from tood.transforms import ResizeKeepRatioCV2, keep_ratio_size

pytestmark = pytest.mark.reference_threads  # compares with tensors recorded from mmdetection

RTOL = 1e-5
BOX_TOL_PX = 0.01
# Aligned boxes are sampled at predicted offsets whose float error (~1e-6 relative) the seeded random weights'
# steep box maps amplify (neighbouring boxes up to hundreds of strides apart): measured 1.3e-5 of the largest box,
# with the reference's exact FPN outputs and either sampling op (grid_sample or deform_conv2d) alike.
ALIGNED_BOX_RTOL = 5e-5
LOSS_PART_RTOL = 3e-5  # see test_training_losses


def test_computes_with_the_reference_s_thread_count():
    """The module's marker pins the thread count of the references, whatever the machine's or OMP_NUM_THREADS."""
    assert torch.get_num_threads() == REFERENCE_THREADS


def build_converted_model(config: str, checkpoint) -> torch.nn.Module:
    """The model of ``config`` in eval mode, with the converted reference weights loaded strictly."""
    model = instantiate(LazyConfig.load(str(REPO_ROOT / config)).model)
    state_dict, _ = convert_mmdet_checkpoint(checkpoint, model)
    model.load_state_dict(state_dict)
    return model.eval()


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) -> (5, C) float64: mean, std, min, max, abs-sum per channel (the oracle's layout)."""
    x = x[0].double().flatten(1)
    return torch.stack([x.mean(1), x.std(1), x.amin(1), x.amax(1), x.abs().sum(1)])


def max_relative_deviation(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| divided by max |ref|: deviation relative to the tensor's magnitude."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def rgb(image_bgr: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image_bgr.numpy()[:, :, ::-1])


def as_model_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8, as Detectron2's DatasetMapper hands images to the model."""
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def model(e2e_oracle):
    return build_converted_model("configs/tood_R_50_1x.py", {k: e2e_oracle[k] for k in ("state_dict", "meta")})


@pytest.fixture(scope="module")
def run(model, e2e_oracle):
    """One inference on the oracle's ``input.tensor``: DenseDetector.forward after its preprocessing, with the
    backbone stages and head branches captured by hooks."""
    captured = {}

    def keep(name):
        return lambda module, inputs, output: captured.setdefault(name, []).append(output)

    bottom_up, head = model.backbone.bottom_up, model.head
    modules = {
        **dict(zip(bottom_up.stage_names, bottom_up.stages)),
        "cls_prob_logits": head.alignment_map,
        "reg_offset": head.offset_map,
        "reg_raw": head.bbox_pred,
        "cls_layer_attn": head.cls_decomp.layer_attention,
        "reg_layer_attn": head.reg_decomp.layer_attention,
    }
    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    metas = e2e_oracle["input"]["img_metas"]
    x = e2e_oracle["input"]["tensor"]
    try:
        with torch.no_grad():
            features = model.backbone(x)
            features = [features[f] for f in model.head_in_features]
            cls_scores, bbox_preds = model.head(features)
            results = model.forward_inference(
                ImageList(x, [tuple(metas["img_shape"])]), features, (cls_scores, bbox_preds)
            )
    finally:
        for handle in handles:
            handle.remove()
    detections = detector_postprocess(results[0], *metas["ori_shape"])
    return dict(captured, P=features, cls_score=cls_scores, bbox_pred=bbox_preds, detections=detections)


@pytest.mark.parametrize("level", [2, 3, 4, 5])
def test_backbone_stage_statistics(run, e2e_oracle, level):
    """Detectron2's ResNet-50 (FrozenBN, stride in the 3x3 conv) = mmdet's ResNet-50 in eval mode."""
    (feature,) = run[f"res{level}"]
    assert list(feature.shape) == e2e_oracle["backbone"]["shapes"][f"C{level}"]
    ours, ref = channel_stats(feature), e2e_oracle["backbone"]["stats"][f"C{level}"]
    # mean / std / min / max relative to the stage's largest activation; abs-sum (all positive) relative.
    scale = ref[3].abs().max()
    deviation = ((ours[:4] - ref[:4]).abs().max() / scale).item()
    abs_sum_deviation = ((ours[4] - ref[4]).abs() / ref[4]).max().item()
    print(f"C{level}: stats {deviation:.2e} of max activation, abs-sum {abs_sum_deviation:.2e} relative")
    assert deviation <= RTOL and abs_sum_deviation <= RTOL


def test_fpn_outputs(run, e2e_oracle):
    """P3-P5 from Detectron2's FPN, P6/P7 from LastLevelP6P7NoReLU: mmdet's FPN with extra convs on P5."""
    for level, (ours, ref) in enumerate(zip(run["P"], e2e_oracle["neck"]["P"]), start=3):
        assert ours.shape == ref.shape
        deviation = max_relative_deviation(ours, ref)
        print(f"P{level}: {deviation:.2e} of max |P|")
        assert deviation <= RTOL


def test_head_outputs(model, run, e2e_oracle):
    head = e2e_oracle["head"]
    assert list(run["detections"].image_size) == e2e_oracle["input"]["img_metas"]["ori_shape"]
    for level, stride in enumerate(head["strides"]):
        score_deviation = (run["cls_score"][level] - head["cls_score"][level]).abs().max().item()
        box_deviation = max_relative_deviation(run["bbox_pred"][level], head["bbox_pred"][level])
        box_px = (run["bbox_pred"][level] - head["bbox_pred"][level]).abs().max().item() * stride
        print(
            f"level {level}: cls_score {score_deviation:.2e} abs; bbox_pred {box_deviation:.2e} of max |box| "
            f"({box_px:.4f} px on boxes up to {head['bbox_pred'][level].abs().max().item() * stride:.0f} px)"
        )
        assert score_deviation <= RTOL
        assert box_deviation <= ALIGNED_BOX_RTOL
        above = (run["cls_score"][level] > model.test_score_thresh).sum().item()
        assert above == e2e_oracle["meta"]["oracle"]["counts"]["num_above_score_thr_per_level"][level]


def test_head_intermediates(run, e2e_oracle):
    """The alignment map M, offsets O, raw regression and both layer attentions, before their combination."""
    head = e2e_oracle["head"]
    for name in ("cls_prob_logits", "reg_offset", "reg_raw", "cls_layer_attn", "reg_layer_attn"):
        deviations = []
        for ours, ref in zip(run[name], head[name]):
            deviations.append(max_relative_deviation(ours.reshape(ref.shape), ref))
        print(f"{name}: {max(deviations):.2e} of max |value|")
        assert max(deviations) <= RTOL


def test_final_detections(run, e2e_oracle):
    """mmdet rescales without clipping; Detectron2's postprocessing clips to the image and drops emptied boxes:
    the reference boxes get the same treatment before the comparison."""
    ref = e2e_oracle["detections"]
    h, w = e2e_oracle["input"]["img_metas"]["ori_shape"]
    ref_boxes = Boxes(ref["bboxes"].clone())
    ref_boxes.clip((h, w))
    kept = ref_boxes.nonempty()
    ours = run["detections"]
    assert len(ours) == kept.sum().item() > 0
    assert torch.equal(ours.pred_classes, ref["labels"][kept])
    score_deviation = (ours.scores - ref["scores"][kept]).abs().max().item()
    box_deviation = (ours.pred_boxes.tensor - ref_boxes.tensor[kept]).abs().max().item()
    print(f"detections: {len(ours)} (same labels), scores {score_deviation:.2e}, boxes {box_deviation:.4f} px")
    assert score_deviation <= RTOL
    assert box_deviation <= BOX_TOL_PX


def test_anchor_based_config_with_the_same_weights(e2e_oracle):
    """No anchor-based reference exists. Provable: the weights load strictly; the classification branch does not
    depend on the anchor type, so its scores equal the reference's; the boxes are the delta-xywh decoding (means 0,
    stds .1 .1 .2 .2) of the reference's raw regression on its square priors, sampled at the reference's offsets
    with mmcv's bilinear rule (torchvision's deform_conv2d), the unaligned box kept where the aligned one is
    invalid. The head runs on the reference's P3-P7."""
    model = build_converted_model("configs/tood_R_50_anchor_based_1x.py", e2e_oracle["state_dict"])
    head = e2e_oracle["head"]
    with torch.no_grad():
        cls_scores, bbox_preds = model.head([p.clone() for p in e2e_oracle["neck"]["P"]])
    for level, stride in enumerate(head["strides"]):
        assert torch.isfinite(bbox_preds[level]).all()
        assert (cls_scores[level] - head["cls_score"][level]).abs().max().item() <= RTOL
        _, _, h, w = head["reg_raw"][level].shape
        deltas = (head["reg_raw"][level] * head["scales"][level]).flatten(2)[0].t() * torch.tensor([0.1, 0.1, 0.2, 0.2])
        priors = head["priors"][level]
        centers, sizes = (priors[:, :2] + priors[:, 2:]) / 2, priors[:, 2:] - priors[:, :2]
        max_ratio = abs(np.log(16 / 1000))
        new_centers = centers + sizes * deltas[:, :2]
        new_sizes = sizes * deltas[:, 2:].clamp(-max_ratio, max_ratio).exp()
        boxes = torch.cat([new_centers - new_sizes / 2, new_centers + new_sizes / 2], dim=1) / stride
        boxes = boxes.t().reshape(1, 4, h, w)
        aligned = deform_conv2d(boxes, head["reg_offset"][level], torch.ones(4, 1, 1, 1))
        invalid = (aligned[:, 0] > aligned[:, 2]) | (aligned[:, 1] > aligned[:, 3])
        expected = torch.where(invalid[:, None], boxes, aligned)
        deviation = max_relative_deviation(bbox_preds[level], expected)
        print(f"anchor-based level {level}: bbox_pred {deviation:.2e} of max |box|")
        assert deviation <= ALIGNED_BOX_RTOL


def test_mmdet_resize_reproduces_the_input_tensor(model, e2e_oracle):
    """ResizeKeepRatioCV2 + the model's normalisation and padding give mmdet's backbone input bit for bit."""
    image = rgb(e2e_oracle["input"]["ori_img_bgr"])
    transform = ResizeKeepRatioCV2(800, 1333).get_transform(image)
    images = model.preprocess_image([{"image": as_model_input(transform.apply_image(image))}])
    assert list(images.image_sizes[0]) == e2e_oracle["input"]["img_metas"]["img_shape"]
    assert torch.equal(images.tensor, e2e_oracle["input"]["tensor"])


def test_mmdet_resize_reproduces_the_training_images(e2e_oracle):
    """Both training images (one not square: 451x300 -> 1203x800) and their boxes, as mmdet resized them."""
    for sample in e2e_oracle["train"]["images"]:
        image = sample["ori_img_bgr"].numpy()
        h, w = sample["ori_shape"]
        assert list(keep_ratio_size(h, w, 800, 1333)) == sample["img_shape"]
        transform = ResizeKeepRatioCV2(800, 1333).get_transform(image)
        assert np.array_equal(transform.apply_image(image), sample["resized_img_bgr"].numpy())
        boxes = transform.apply_box(sample["gt_bboxes_ori"].numpy().astype(np.float64))
        np.testing.assert_allclose(boxes, sample["gt_bboxes"].numpy(), atol=1e-4)


def test_detectron2_default_resize_differs_by_one_intensity_level(e2e_oracle):
    """Detectron2's ResizeShortestEdge gives the same size but resizes with PIL, which rounds differently from
    OpenCV: pixels differ by at most one level (measured effect on this model's detections: docs/parity.md)."""
    image = rgb(e2e_oracle["input"]["ori_img_bgr"])
    ours = ResizeShortestEdge(800, 1333).get_transform(image).apply_image(image).astype(np.int16)
    reference = ResizeKeepRatioCV2(800, 1333).get_transform(image).apply_image(image).astype(np.int16)
    assert ours.shape == reference.shape
    difference = np.abs(ours - reference)
    print(f"PIL vs OpenCV resize: max {difference.max()} level(s), {(difference > 0).mean():.1%} of values differ")
    assert difference.max() <= 1


@pytest.fixture(scope="module")
def training_batch(model, e2e_oracle):
    """The two training images through the model's preprocessing, backbone and head (no gradients needed)."""
    inputs = []
    for sample in e2e_oracle["train"]["images"]:
        instances = Instances(tuple(sample["img_shape"]))
        instances.gt_boxes = Boxes(sample["gt_bboxes"])
        instances.gt_classes = sample["gt_labels"]
        inputs.append({"image": as_model_input(rgb(sample["resized_img_bgr"])), "instances": instances})
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
    return images, features, predictions, [x["instances"] for x in inputs]


def test_training_batch_input(training_batch, e2e_oracle):
    images = training_batch[0]
    train = e2e_oracle["train"]
    assert list(images.tensor.shape) == train["batch_input_shape"]  # padded to [800, 1216] as mmdet's
    checksum = train["batch_input_checksum"]
    assert images.tensor.double().sum().item() == pytest.approx(checksum["sum"], rel=1e-9)
    assert images.tensor.double().abs().sum().item() == pytest.approx(checksum["abs_sum"], rel=1e-9)


@pytest.mark.parametrize("phase", ["epoch0", "epoch4"], ids=["atss_warmup", "task_aligned"])
def test_training_losses(model, training_batch, e2e_oracle, phase):
    """epoch0: ATSS + focal loss (iteration 0); epoch4: task alignment + QFL (from ``tal_start_iter`` on).

    The batch pads the 800x800 image to 800x1216: as mmdet (its anchors' valid flags), anchors beyond an image's own
    size padded to 32 take part neither in the assignment nor in the losses. Each loss is held to
    ``LOSS_PART_RTOL``: QFL sums p^2 * BCE over ~3e6 probabilities mostly below 1e-2 and t_hat carries IoU^6,
    which amplify the forward's float32 deviations (1.4e-5 measured on the task-aligned classification loss).
    """
    images, features, predictions, gt_instances = training_batch
    ref = e2e_oracle["train"]["epochs"][phase]
    with EventStorage(0 if phase == "epoch0" else model.tal_start_iter), torch.no_grad():
        losses = model.forward_training(images, features, predictions, gt_instances)
    total = sum(losses.values()).item()
    print(
        f"{phase}: loss_cls {losses['loss_cls'].item():.6f} (ref {ref['loss_cls_sum'].item():.6f}), "
        f"loss_box_reg {losses['loss_box_reg'].item():.6f} (ref {ref['loss_bbox_sum'].item():.6f}), "
        f"total relative deviation {abs(total / ref['total'].item() - 1):.2e}"
    )
    assert losses["loss_cls"].item() == pytest.approx(ref["loss_cls_sum"].item(), rel=LOSS_PART_RTOL)
    assert losses["loss_box_reg"].item() == pytest.approx(ref["loss_bbox_sum"].item(), rel=LOSS_PART_RTOL)
    assert total == pytest.approx(ref["total"].item(), rel=RTOL)
