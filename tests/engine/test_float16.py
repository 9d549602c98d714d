"""Float16 training as on a GPU (``train.amp.enabled=True`` on CUDA), run on the CPU: the forward pass and the losses
under ``torch.autocast(<device>, dtype=torch.float16)``, the step by :class:`~tood.engine.train_loop.CheckedAMPTrainer`
as Detectron2's AMPTrainer takes it (scale the loss, backward, unscale, skip the step on inf / NaN, step, update the
scale), with ``torch.amp.GradScaler("cpu")``.

CPU autocast casts the same ops to float16 as CUDA's (convolutions, matrix products) and leaves more of the others in
float16 than CUDA does (group norm, batch norm, exp, which CUDA runs in float32): the activations here are at least as
exposed to float16's range (65504) and precision as on a GPU. float16 is emulated on CPUs without float16 units: a
step costs about 10x float32's, hence one R-50 step on one small image and a few dozen steps of the quick-start model.

Tolerances, from float16's unit roundoff u = 2**-11 (4.9e-4) and the depth of the network. The deepest path from the
input to a loss rounds to float16 about L = 60 times (ResNet-50's 50 weighted layers on its deepest path, the FPN's
2, the T-Head's 6 and its alignment convs); independent roundings add like a random walk, so an output deviates by
about sqrt(L) u = 3.8e-3 relative, and a gradient, after as many roundings again in the backward pass, by about
sqrt(2L) u = 5.3e-3:

* each loss: sqrt(L) u. The losses (float32, from float32 boxes and scores) average thousands of such outputs, so
  they deviate far less (measured 3e-5);
* the norm of all gradients: 2 sqrt(2L) u = 1.1e-2;
* the median over tensors of their gradient norm's deviation: sqrt(2L) u;
* each tensor's gradient norm: 20 sqrt(2L) u = 0.1. A bias or a norm's scale sums its channel's gradient over every
  position, terms of both signs, whose rounding errors do not cancel as the terms do: its relative error grows by the
  ratio of the sum of absolute values to the absolute sum, which 20 allows. A gradient lost to underflow (without
  loss scaling, the P6 / P7 convs' gradients, ~1e-6 to 1e-4, flush to zero) deviates by 100 %.

Run with ``-s`` to see the measured deviations.
"""

import copy
import statistics

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances, pairwise_iou

from benchmarks.gpu import StepLog, train_steps
from tests.conftest import REPO_ROOT, reregister_coco
from tests.parity.test_e2e_parity import as_model_input, build_converted_model, rgb
from tood.data import get_shapes_dataset
from tood.transforms import ResizeKeepRatioCV2

U = 2.0**-11  # float16's unit roundoff
DEPTH = 60  # float16 roundings on the deepest path from the input to a loss (module docstring)
LOSS_RTOL = DEPTH**0.5 * U
GRAD_RTOL = (2 * DEPTH) ** 0.5 * U
TOTAL_GRAD_RTOL = 2 * GRAD_RTOL
TENSOR_GRAD_RTOL = 20 * GRAD_RTOL
R50_IMAGE_SIZE = 256  # the reference's first training image (800 x 800), resized: one float16 step in seconds


class ActivationRecorder:
    """Forward hooks on every module of ``model``: whether any floating output was inf / NaN, and the largest
    finite |value| among the float16 ones."""

    def __init__(self, model):
        self.nonfinite, self.largest = [], 0.0
        self.handles = [m.register_forward_hook(self.hook(n)) for n, m in model.named_modules()]

    def hook(self, name):
        def check(module, inputs, output):
            tensors = output if isinstance(output, (list, tuple)) else [output]
            for t in (t for t in tensors if torch.is_tensor(t) and t.is_floating_point()):
                if not torch.isfinite(t).all():
                    self.nonfinite.append(name)
                elif t.dtype == torch.float16 and t.numel():
                    self.largest = max(self.largest, t.detach().abs().max().item())

        return check

    def remove(self):
        for handle in self.handles:
            handle.remove()


class SkipSteps(StepLog):
    """A :class:`~benchmarks.gpu.StepLog` whose optimizer does not step in the iterations ``skipped``."""

    def __init__(self, skipped, optimizer):
        super().__init__()
        self.skipped, self.optimizer = skipped, optimizer

    def before_step(self):
        super().before_step()
        if self.trainer.iter in self.skipped:
            self.optimizer.step = lambda *args, **kwargs: None

    def after_step(self):
        super().after_step()
        vars(self.optimizer).pop("step", None)


def relative(ours: float, ref: float) -> float:
    return abs(ours - ref) / abs(ref)


# --- the R-50 detector on the reference's image and weights -------------------------------------------------------


@pytest.fixture(scope="module")
def r50_step0(e2e_oracle):
    """Step 0 of the R-50 detector of configs/tood_R_50_1x.py (ATSS phase), from the reference's weights, on its first
    training image resized to 256 px: in float32, and in float16 AMP with the module hooks watching the forward.
    The learning rate is 0, so a skipped step could be retaken on the same weights."""
    sample = e2e_oracle["train"]["images"][0]
    image = rgb(sample["resized_img_bgr"])
    transform = ResizeKeepRatioCV2(R50_IMAGE_SIZE, R50_IMAGE_SIZE * 2).get_transform(image)
    resized = transform.apply_image(image)
    instances = Instances(resized.shape[:2])
    instances.gt_boxes = Boxes(torch.as_tensor(transform.apply_box(sample["gt_bboxes"].numpy())))
    instances.gt_classes = sample["gt_labels"]
    batch = [{"image": as_model_input(resized), "instances": instances}]
    weights = {k: e2e_oracle[k] for k in ("state_dict", "meta")}

    runs = {}
    for precision in (None, torch.float16):
        model = build_converted_model("configs/tood_R_50_1x.py", weights).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        activations = ActivationRecorder(model)
        try:
            steps = train_steps(model, [batch], optimizer, 1, "cpu", precision, StepLog(grads=True))
        finally:
            activations.remove()
        runs[precision] = dict(step=steps[0], activations=activations)
    return runs[None], runs[torch.float16]


@pytest.mark.slow  # one float16 step of R-50: ~1 min on 2 cores
def test_r50_float16_step0_losses(r50_step0):
    fp32, fp16 = (run["step"] for run in r50_step0)
    assert fp32["scale"] is None and fp16["scale"] == 2.0**16  # the loss was scaled by GradScaler's initial scale
    assert not fp16["skipped"]
    for key in ("loss_cls", "loss_box_reg"):
        deviation = relative(fp16[key], fp32[key])
        print(f"R-50 step 0, {key}: float16 {fp16[key]:.6f}, float32 {fp32[key]:.6f}, {deviation:.1e} relative")
        assert deviation <= LOSS_RTOL, key


@pytest.mark.slow  # one float16 step of R-50: ~1 min on 2 cores
def test_r50_float16_outputs_and_unscaled_gradients_are_finite(r50_step0):
    """Every module's output in the forward pass (backbone, FPN, head) and every gradient after unscaling is
    finite; the largest float16 activation shows the headroom left below 65504."""
    activations = r50_step0[1]["activations"]
    print(f"R-50 float16: largest activation {activations.largest:.4g} (float16 max 65504)")
    assert activations.nonfinite == [] and 0 < activations.largest < torch.finfo(torch.float16).max
    grads = r50_step0[1]["step"]["grads"]
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert {g.dtype for g in grads.values()} == {torch.float32}


@pytest.mark.slow  # one float16 step of R-50: ~1 min on 2 cores
def test_r50_float16_step0_gradient_norms(r50_step0):
    """After unscaling, the gradients are float32's up to float16 rounding: the norm of all of them, the median
    tensor and every tensor within the tolerances of the module docstring; tensors without gradient (levels
    without positives) have none in both."""
    ours, ref = r50_step0[1]["step"]["grads"], r50_step0[0]["step"]["grads"]
    assert sorted(ours) == sorted(ref)
    total = relative(
        torch.stack([g.norm() for g in ours.values()]).norm(), torch.stack([g.norm() for g in ref.values()]).norm()
    )
    deviations = {}
    for name, g in ref.items():
        if g.norm() == 0:
            assert ours[name].norm() == 0, name
        else:
            deviations[name] = relative(ours[name].norm().item(), g.norm().item())
    worst = max(deviations, key=deviations.get)
    median = statistics.median(deviations.values())
    print(
        f"R-50 step-0 gradient norms, float16 vs float32: all {total:.1e}, median tensor {median:.1e}, "
        f"worst {deviations[worst]:.1e} ({worst}); {len(ref) - len(deviations)} tensors without gradient"
    )
    assert total <= TOTAL_GRAD_RTOL
    assert median <= GRAD_RTOL
    assert deviations[worst] <= TENSOR_GRAD_RTOL, worst


# --- the quick-start model trained a few dozen steps ----------------------------------------------------------------

WARM_STEPS = 96  # float32, from scratch: 12 passes over the 8 tiny images
QUICK_STEPS = 24  # in each precision: 12 ATSS steps, then 12 task-aligned ones
QUICK_LR = 1e-4  # the quick start's AdamW learning rate after its first step down (x0.1)
QUICK_SIZE = 128


def shapes_inputs(cfg, folder, name):
    """The images and boxes of the generated dataset in ``folder``, through the config's training mapper at 128 px
    without flips."""
    reregister_coco(name, folder / "annotations.json", folder / "images")
    augmentations = cfg.dataloader.train.mapper.augmentations
    augmentations[0].short_edge_length = augmentations[0].max_size = QUICK_SIZE
    augmentations[1].prob = 0.0
    mapper = instantiate(cfg.dataloader.train.mapper)
    return [mapper(d) for d in DatasetCatalog.get(name)]


@pytest.fixture(scope="module")
def quick_runs(tiny_shapes, tmp_path_factory):
    """The quick-start model trained on the 8 tiny images (batches of 2, cycled): 96 float32 steps from scratch,
    then from there 24 more with its AdamW at 1e-4, in float16 AMP, and in float32 skipping the steps that the
    scaler skipped; each one's detections in float32 on 4 images of another seed.

    Why not float16 from scratch: AdamW's first updates are about ``lr * sign(gradient)`` whatever the gradient's size,
    so rounding-level differences in small gradients flip whole updates, and any two runs that differ by rounding
    part within 5 steps (from scratch, measured after 24 steps: the detections of float16- and of bfloat16-trained
    models match float32's at a median IoU of 0.4 and 0.7). From a model that has learned the first steps, they
    stay together, and what differs is float16's arithmetic.
    """
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "quickstart_shapes.py"))
    cfg.model.test_score_thresh = 0.0  # a few dozen steps leave most scores under the usual 0.05
    train_inputs = shapes_inputs(cfg, tiny_shapes, "float16_train")
    batches = [train_inputs[i : i + 2] for i in range(0, len(train_inputs), 2)]
    val_folder = get_shapes_dataset(num_images=4, seed=1, image_size=QUICK_SIZE, root=tmp_path_factory.mktemp("val"))
    val_images = [{"image": x["image"]} for x in shapes_inputs(cfg, val_folder, "float16_val")]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from a second thread
    runs = {}
    try:
        torch.manual_seed(0)
        warm = instantiate(cfg.model).train()
        warm.tal_start_iter = WARM_STEPS + 1  # ATSS throughout
        cfg.optimizer.params.model = warm
        train_steps(warm, batches, instantiate(cfg.optimizer), WARM_STEPS, "cpu")
        skipped = []
        for precision in (torch.float16, None):
            model = copy.deepcopy(warm)
            model.tal_start_iter = QUICK_STEPS // 2
            cfg.optimizer.params.model = model
            cfg.optimizer.lr = QUICK_LR
            optimizer = instantiate(cfg.optimizer)
            # float32 skips the steps the scaler skipped, so that both take the same updates.
            log = StepLog() if precision else SkipSteps(skipped, optimizer)
            steps = train_steps(model, batches, optimizer, QUICK_STEPS, "cpu", precision, log)
            skipped = [i for i, s in enumerate(steps) if s["skipped"]]
            model.eval()
            with torch.no_grad():
                detections = [r["instances"] for r in model(val_images)]
            runs[precision] = dict(steps=steps, detections=detections)
    finally:
        torch.set_num_threads(threads)
    return runs[None], runs[torch.float16]


def pass_means(steps, key):
    """Mean ``key`` over the first and over the last pass (4 steps) of each phase."""
    half = QUICK_STEPS // 2
    phases = (steps[:half], steps[half:])
    return [(statistics.mean(s[key] for s in p[:4]), statistics.mean(s[key] for s in p[-4:])) for p in phases]


@pytest.mark.slow  # 24 float16 steps: ~40 s on one core
def test_quick_start_float16_training_learns_in_both_phases(quick_runs):
    """Losses fall within the ATSS phase and within the task-aligned one; at most 2 steps skipped (the scaler
    starts at 2**16 and halves on each overflow); every step's losses within 1 % of float32's in the ATSS phase,
    5 % in the task-aligned one, whose top-k choices turn rounding-level differences into ~1e-2 within two steps
    (tests/parity/test_train_parity.py)."""
    fp32, fp16 = (run["steps"] for run in quick_runs)
    skipped = [i for i, s in enumerate(fp16) if s["skipped"]]
    print(f"quick start, float16: steps {skipped} of {QUICK_STEPS} skipped")
    assert all(torch.isfinite(torch.tensor(s["total_loss"])) for s in fp16)
    assert len(skipped) <= 2
    half = QUICK_STEPS // 2
    for (first, last), phase, steps, rtol in zip(
        pass_means(fp16, "total_loss"), ("ATSS", "task-aligned"), (slice(0, half), slice(half, None)), (0.01, 0.05)
    ):
        pairs = list(zip(fp16[steps], fp32[steps]))
        deviation = max(relative(a[k], b[k]) for a, b in pairs for k in ("loss_cls", "loss_box_reg"))
        print(
            f"quick start, float16, {phase}: total loss {first:.4f} -> {last:.4f} (mean of a pass); losses at most "
            f"{deviation:.1e} from float32's"
        )
        assert last < first, phase
        assert deviation <= rtol, phase


@pytest.mark.slow  # 24 float16 steps: ~40 s on one core
def test_quick_start_float16_detections_match_float32(quick_runs):
    """On 4 validation images, the float32-trained model's 10 best detections of each image against the
    float16-trained model's detections of the same class: median IoU of the best match >= 0.95 and every one >= 0.5;
    median score gap <= 0.01, and every one <= 0.1."""
    ious, score_gaps = [], []
    for ref, ours in zip(*(run["detections"] for run in quick_runs)):
        ref = ref[ref.scores.argsort(descending=True)[:10]]
        iou = pairwise_iou(ref.pred_boxes, ours.pred_boxes)
        iou[ref.pred_classes[:, None] != ours.pred_classes[None]] = 0
        best, match = iou.max(dim=1)
        ious += best.tolist()
        score_gaps += (ours.scores[match] - ref.scores).abs().tolist()
    print(
        f"quick start detections, float16- vs float32-trained, {len(ious)} best: IoU min {min(ious):.3f}, median "
        f"{statistics.median(ious):.3f}; score gap max {max(score_gaps):.3f}, "
        f"median {statistics.median(score_gaps):.4f}"
    )
    assert statistics.median(ious) >= 0.95 and min(ious) >= 0.5
    assert statistics.median(score_gaps) <= 0.01 and max(score_gaps) <= 0.1
