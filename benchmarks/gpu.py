"""The measurements that need a GPU, one function each, for ``tools/gpu_check.py``; each takes its device and runs on
a CPU too (smaller), which is how they are tested where no GPU is.

* :func:`inference_parity`: the R-50 detector with the reference's converted weights against mmdetection 3.3's
  recorded outputs (the e2e reference of tests/parity/test_e2e_parity.py, at that test's tolerances);
* :func:`training_speed`: seconds per training iteration and peak memory of a config, in float32 or float16 AMP;
* :func:`dcn_parity`: torchvision's deformable convolution (CUDA's DCNv2 path) against this project's CPU DCNv2
  (:func:`tood.layers.deform_conv2d_by_sampling`), on the DCN configs' layer shapes;
* :func:`assigner_cost`: time and peak memory of ``TaskAlignedAssigner`` at many ground-truth boxes;
* :func:`float16_step0` and :func:`float16_training`: the float16 AMP numerics of tests/engine/test_float16.py.

Each returns a dict of plain numbers (a JSON record). On CUDA, TF32 is off for the parity checks, which hold
float32's tolerances.
"""

import contextlib
import copy
import itertools
import math
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import deform_conv2d

from tood.assigner import TaskAlignedAssigner
from tood.conversion import convert_mmdet_checkpoint
from tood.engine.train_loop import build_trainer
from tood.layers import deform_conv2d_by_sampling
from tood.transforms import ResizeKeepRatioCV2

from .assigner import make_inputs
from .detectors import TrainStep, make_batch
from .timing import median_times, peak_memory_mb

__all__ = [
    "DCN_LAYERS",
    "StepLog",
    "assigner_cost",
    "dcn_parity",
    "float16_step0",
    "float16_training",
    "inference_parity",
    "reference_model",
    "train_steps",
    "training_speed",
]

# tests/parity/test_e2e_parity.py's tolerances: features and scores relative, boxes in pixels; aligned boxes 5e-5.
PARITY_RTOL, BOX_TOL_PX, ALIGNED_BOX_RTOL = 1e-5, 0.01, 5e-5


@contextlib.contextmanager
def no_tf32():
    """float32 matrix products and convolutions in full float32 on CUDA (Ampere and later would use TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_model(config: str, reference, device) -> torch.nn.Module:
    """The model of ``config`` with the reference's weights (mmdetection's format, converted), on ``device``."""
    model = instantiate(LazyConfig.load(config).model)
    state_dict, _ = convert_mmdet_checkpoint({k: reference[k] for k in ("state_dict", "meta")}, model)
    model.load_state_dict(state_dict)
    return model.to(device)


def _max_relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def inference_parity(config: str, reference, device) -> Dict[str, float]:
    """The reference's input tensor through ``config``'s model on ``device``: the largest deviation of FPN P3-P7 and
    of the aligned boxes (relative to the largest value), of the scores and final detection scores (absolute), of the
    final boxes (px), and whether the detections have the reference's count and labels; ``passed`` at
    tests/parity/test_e2e_parity.py's tolerances."""
    model = reference_model(config, reference, device).eval()
    metas = reference["input"]["img_metas"]
    x = reference["input"]["tensor"].to(device)
    with torch.no_grad(), no_tf32():
        features = model.backbone(x)
        features = [features[f] for f in model.head_in_features]
        scores, boxes = model.head(features)
        results = model.forward_inference(ImageList(x, [tuple(metas["img_shape"])]), features, (scores, boxes))
    detections = detector_postprocess(results[0], *metas["ori_shape"]).to("cpu")
    ref = reference["detections"]
    ref_boxes = Boxes(ref["bboxes"].clone())
    ref_boxes.clip(tuple(metas["ori_shape"]))  # as Detectron2's postprocessing (see the parity test)
    kept = ref_boxes.nonempty()
    same = len(detections) == int(kept.sum()) and torch.equal(detections.pred_classes, ref["labels"][kept])
    out = {
        "fpn_relative": max(_max_relative(o, r) for o, r in zip(features, reference["neck"]["P"])),
        "cls_score_abs": max((o.cpu() - r).abs().max().item() for o, r in zip(scores, reference["head"]["cls_score"])),
        "bbox_pred_relative": max(_max_relative(o, r) for o, r in zip(boxes, reference["head"]["bbox_pred"])),
        "detections": len(detections),
        "same_count_and_labels": same,
        "detection_score_abs": (detections.scores - ref["scores"][kept]).abs().max().item() if same else math.inf,
        "detection_box_px": (detections.pred_boxes.tensor - ref_boxes.tensor[kept]).abs().max().item()
        if same
        else math.inf,
    }
    out["passed"] = bool(
        same
        and out["fpn_relative"] <= PARITY_RTOL
        and out["cls_score_abs"] <= PARITY_RTOL
        and out["bbox_pred_relative"] <= ALIGNED_BOX_RTOL
        and out["detection_score_abs"] <= PARITY_RTOL
        and out["detection_box_px"] <= BOX_TOL_PX
    )
    return out


def training_speed(
    config: str, device, amp: bool, size: Tuple[int, int] = (800, 1333), batch: int = 2, iters: int = 20, warmup=2
) -> Dict[str, float]:
    """Seconds per training iteration (median of ``iters`` after ``warmup``) of ``config``'s model at ``batch``
    random images of ``size`` with 8 boxes each (:class:`benchmarks.detectors.TrainStep`: TOOD's loop, float32 or
    with ``amp`` its default AMP for the device), in the task-aligned phase; and the peak memory of one more
    iteration: beyond what was held before it, and on CUDA also in all (``torch.cuda.max_memory_allocated``, what
    mmdetection logs as a run's memory)."""
    cfg = LazyConfig.load(config)
    cfg.model.tal_start_iter = 0
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    step = TrainStep(model, make_batch(batch, size, 8, cfg.model.num_classes, device), amp)
    with EventStorage(0):
        seconds = median_times({"step": step}, iters, warmup, device)["step"]
        out = {"s_per_iter": seconds, "extra_peak_mb": peak_memory_mb(step, device)}
    if torch.device(device).type == "cuda":  # the peak of that last iteration, model and optimizer state included
        out["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# (name, in channels, out channels, groups, feature H, W at an 800 x 1333 input): the 3x3 DCNv2 layers of the DCN
# configs (R-101 c3-c5, ResNeXt-101 64x4d c4-c5, the T-Head's first interactive convs on P3).
DCN_LAYERS = [
    ("R-101 res3", 128, 128, 1, 100, 167),
    ("R-101 res4", 256, 256, 1, 50, 84),
    ("R-101 res5", 512, 512, 1, 25, 42),
    ("X-101-64x4d res4", 1024, 1024, 64, 50, 84),
    ("X-101-64x4d res5", 2048, 2048, 64, 25, 42),
    ("T-Head P3", 256, 256, 1, 100, 167),
]


def dcn_parity(device, layers=DCN_LAYERS, scale: float = 1.0, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Per layer: torchvision's ``deform_conv2d`` on ``device`` against :func:`deform_conv2d_by_sampling` on the
    CPU, same random input, offsets (a few pixels) and mask, in float32: the largest deviation relative to the
    largest output, and each one's milliseconds. ``scale`` shrinks the feature maps (for a CPU)."""
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for name, cin, cout, groups, h, w in layers:
        h, w = max(2, round(h * scale)), max(2, round(w * scale))
        x = torch.randn(1, cin, h, w, generator=gen)
        offset = 3 * torch.randn(1, 18, h, w, generator=gen)
        mask = torch.rand(1, 9, h, w, generator=gen)
        weight = torch.randn(cout, cin // groups, 3, 3, generator=gen) / math.sqrt(9 * cin / groups)
        args = [t.to(device) for t in (x, offset, weight)]
        with no_tf32():
            timed = median_times(
                {
                    "torchvision": lambda: deform_conv2d(*args, padding=1, mask=mask.to(device)),  # noqa: B023
                    "sampling": lambda: deform_conv2d_by_sampling(x, offset, mask, weight, padding=(1, 1)),  # noqa: B023
                },
                iters=3,
                warmup=1,
                device=device,
            )
            ours = deform_conv2d_by_sampling(x, offset, mask, weight, padding=(1, 1))
            theirs = deform_conv2d(*args, padding=1, mask=mask.to(device)).cpu()
        results[name] = {
            "relative": _max_relative(theirs, ours),
            "torchvision_ms": 1000 * timed["torchvision"],
            "cpu_sampling_ms": 1000 * timed["sampling"],
        }
    return results


def assigner_cost(device, num_gts_list: Sequence[int] = (500, 5000), iters: int = 5) -> Dict[str, Dict[str, float]]:
    """``TaskAlignedAssigner`` (top-13) on the anchors of an 832 x 1152 image (19953), batch 2, 80 classes, per GT
    count: median milliseconds of ``iters`` calls and the extra peak MB of one (on CUDA max_memory_allocated)."""
    assigner = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)
    results = {}
    for num_gts in num_gts_list:
        scores, boxes, points, gt_boxes, gt_labels = make_inputs(num_gts)
        inputs = (
            scores.to(device),
            boxes.to(device),
            points.to(device),
            [b.to(device) for b in gt_boxes],
            [lab.to(device) for lab in gt_labels],
        )
        seconds = median_times({"assign": lambda: assigner(*inputs)}, iters, 1, device)["assign"]  # noqa: B023
        results[str(num_gts)] = {
            "anchors": int(points.shape[0]),
            "ms": 1000 * seconds,
            "peak_mb": peak_memory_mb(lambda: assigner(*inputs), device),  # noqa: B023
        }
    return results


class StepLog(HookBase):
    """Each step's losses, loss scale (before the step) and whether the gradient scaler skipped it; with ``grads``,
    the gradients after the step (under float16 AMP unscaled by the scaler)."""

    def __init__(self, grads: bool = False):
        self.grads = grads
        self.steps = []

    def before_step(self):
        scaler = getattr(self.trainer, "grad_scaler", None)
        self.scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def after_step(self):
        storage = self.trainer.storage
        step = {k: storage.history(k).latest() for k in ("loss_cls", "loss_box_reg", "total_loss")}
        # The scale falls only when the scaler found inf / NaN gradients and skipped the step (it grows after 2000
        # good steps in a row).
        step["skipped"] = self.scale is not None and self.trainer.grad_scaler.get_scale() < self.scale
        step["scale"] = self.scale
        if self.grads:
            model = self.trainer.model
            step["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        self.steps.append(step)


def train_steps(model, batches, optimizer, steps: int, device, precision=None, log: Optional[StepLog] = None):
    """``steps`` iterations of TOOD's training loop (``build_trainer``) on ``batches`` (a list, cycled): float32, or
    AMP in ``precision``. Returns the :class:`StepLog`'s steps."""
    trainer = build_trainer(
        model, itertools.cycle(batches), optimizer, amp=precision is not None, device=device, precision=precision
    )
    log = log or StepLog()
    trainer.register_hooks([log])
    trainer.train(0, steps)
    return log.steps


def float16_step0(config: str, reference, device, size: Optional[int] = None) -> Dict[str, float]:
    """Step 0 (ATSS phase) of ``config``'s model from the reference's weights on its first training image (resized
    to ``size`` if given), in float32 and in float16 AMP (:class:`~tood.engine.train_loop.CheckedAMPTrainer`): the
    float16 losses' and gradient norm's deviations from float32's, and whether its gradients are finite."""
    sample = reference["train"]["images"][0]
    image = np.ascontiguousarray(sample["resized_img_bgr"].numpy()[:, :, ::-1])
    boxes = sample["gt_bboxes"].numpy()
    if size is not None:
        transform = ResizeKeepRatioCV2(size, size * 2).get_transform(image)
        image, boxes = transform.apply_image(image), transform.apply_box(boxes)
    instances = Instances(image.shape[:2])
    instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    instances.gt_classes = sample["gt_labels"]
    batch = [{"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "instances": instances}]
    runs = {}
    for precision in (None, torch.float16):
        model = reference_model(config, reference, device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        with no_tf32():
            (step,) = train_steps(model, [batch], optimizer, 1, device, precision)
        grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
        step["grad_norm"] = torch.stack(grads).norm().item()
        step["finite"] = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        runs[precision] = step
    fp32, fp16 = runs[None], runs[torch.float16]
    out = {f"float16_{k}": v for k, v in fp16.items()}
    for key in ("loss_cls", "loss_box_reg", "grad_norm"):
        out[f"{key}_relative"] = abs(fp16[key] - fp32[key]) / abs(fp32[key])
    return out


def float16_training(config: str, device, steps: int = 24, size: Tuple[int, int] = (320, 320), batch: int = 8):
    """``config``'s model from one seed trained ``steps`` steps on one random batch with its optimizer, in float32
    and in float16 AMP, the task-aligned phase from the middle on: each one's first and last total loss, and the
    steps the scaler skipped."""
    cfg = LazyConfig.load(config)
    cfg.model.tal_start_iter = steps // 2
    torch.manual_seed(0)
    initial = instantiate(cfg.model).to(device).train()
    data = make_batch(batch, size, 4, cfg.model.num_classes, device)
    out = {}
    for name, precision in (("float32", None), ("float16", torch.float16)):
        model = copy.deepcopy(initial)
        cfg.optimizer.params.model = model
        start = time.perf_counter()
        steps_log = train_steps(model, [data], instantiate(cfg.optimizer), steps, device, precision)
        losses = [s["total_loss"] for s in steps_log]
        half = steps // 2
        out[name] = {
            "first_loss": losses[0],
            "last_atss_loss": losses[half - 1],
            "first_tal_loss": losses[half],
            "last_loss": losses[-1],
            "skipped_steps": [i for i, s in enumerate(steps_log) if s["skipped"]],
            "s_per_step": (time.perf_counter() - start) / steps,
        }
    return out
