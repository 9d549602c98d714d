"""Training parity with mmdetection 3.3: the reference's 4 SGD steps (``train_oracle``, shared/oracle/README.md).

Everything comes from the project's own builders: configs/tood_R_50_1x.py's model, optimizer and LR schedule, and
``tood.engine.build_trainer``'s loop, started from the e2e oracle's weights (converted by ``tood.conversion``) on
the reference's two training images, the same batch at every step, the learning rate held at the reference's. The
only changes to the config are the reference run's own: ``optimizer.lr`` and the task-aligned phase from step 2.

Compared: the loss of every step, the step-0 gradient of every parameter, every tensor's change after 4 steps,
the frozen tensors, and the 1x learning rate at the reference's tabulated iterations. Run with ``-s`` to see the
measured deviations.

From the first task-aligned step on, the trajectory is chaotic at float32 precision, ours and the reference's alike:
the task-aligned assigner's top-k and argmax choices are discontinuous in the predictions, and after two updates
some boxes of P6/P7 are thousands of pixels wide (exp of the regression), so rounding moves a few anchors from one
side of a choice to the other. Measured here on our own trajectory (README, "Parity with the reference"): the same
code with 1 thread instead of 2, with float64, or with the initial weights multiplied by 1 + 1e-7 noise gives
classification losses up to 1.4e-3 apart at step 2 and 2.6e-2 at step 3 (after two warm-up steps that agree to
1e-6), with the reference's within or next to that spread (1.0e-3 and 2.0e-2 from our run); and those runs' weight
changes after 4 steps are 30-41 % from the reference's in the worst tensor (this run: 30 %, 7 % in the median).
So the warm-up steps and the step-0 gradients are held to the issue's tolerances, and the task-aligned steps and
the 4-step changes to that rounding envelope.
"""

import itertools

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase
from detectron2.solver import LRMultiplier
from detectron2.structures import Boxes, Instances

from tests.conftest import REPO_ROOT
from tood.conversion import convert_mmdet_checkpoint
from tood.engine import build_trainer
from tood.mmdet_names import MMDET_TOOD_NAME_MAP

CONFIG = str(REPO_ROOT / "configs" / "tood_R_50_1x.py")
LOSS_RTOL = 1e-4
GRAD_L2_RTOL = 1e-3
LR_RTOL = 1e-6
# The rounding envelope of the task-aligned steps (module docstring), about twice the spread of our own runs: relative
# deviation of each loss at steps 2 and 3, and of the 4-step change of the median and of the worst tensor.
TAL_LOSS_RTOL = {2: 5e-3, 3: 5e-2}
DELTA_MEDIAN_RTOL = 0.15
DELTA_WORST_RTOL = 0.6


def relative(ours: float, ref: float) -> float:
    return abs(ours - ref) / abs(ref)


def stats(x: torch.Tensor) -> torch.Tensor:
    """float64 ``[sum, abs_sum, l2, abs_max]``, the oracle's rows."""
    x = x.detach().double()
    return torch.stack([x.sum(), x.abs().sum(), x.norm(), x.abs().max()])


class Recorder(HookBase):
    """Keeps each step's losses, and the gradients of step 0 (still in ``.grad`` after the optimizer step)."""

    def __init__(self, model):
        self.model = model
        self.losses, self.grads = [], {}

    def after_step(self):
        self.losses.append({k: h.latest() for k, h in self.trainer.storage.histories().items() if "loss" in k})
        if self.trainer.iter == 0:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def training_batch(train_oracle):
    """The reference's training images (BGR as resized for training) as a Detectron2 batch, RGB (3, H, W)."""
    batch = []
    for sample in train_oracle["images"]:
        image = np.ascontiguousarray(sample["resized_img_bgr"].numpy()[:, :, ::-1].transpose(2, 0, 1))
        instances = Instances(tuple(sample["img_shape"]))
        instances.gt_boxes = Boxes(sample["gt_bboxes"].float())
        instances.gt_classes = sample["gt_labels"].long()
        batch.append({"image": torch.as_tensor(image), "instances": instances})
    return batch


def run_trajectory(train_oracle, e2e_oracle, weight_noise: float = 0.0):
    """The reference's steps with our builders; ``weight_noise``: multiply every trained initial weight by
    ``1 + weight_noise * N(0, 1)`` first (a fixed draw)."""
    meta = train_oracle["meta"]
    cfg = LazyConfig.load(CONFIG)
    cfg.model.tal_start_iter = meta["tal_from"]
    cfg.optimizer.lr = meta["lr"]
    model = instantiate(cfg.model)
    state_dict, _ = convert_mmdet_checkpoint({k: e2e_oracle[k] for k in ("state_dict", "meta")}, model)
    model.load_state_dict(state_dict)
    model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if weight_noise:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1 + weight_noise * torch.randn(p.shape, generator=generator))

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    trainer = build_trainer(model, itertools.repeat(training_batch(train_oracle)), optimizer)
    recorder = Recorder(model)
    trainer.register_hooks([recorder])
    torch.set_num_threads(2)  # the reference's thread count
    trainer.train(0, meta["steps"])
    return dict(model=model, optimizer=optimizer, initial=initial, recorder=recorder)


@pytest.fixture(scope="module")
def trajectory(train_oracle, e2e_oracle):
    return run_trajectory(train_oracle, e2e_oracle)


def theirs(name: str) -> str:
    mmdet = MMDET_TOOD_NAME_MAP.inverse(name)
    assert mmdet is not None, f"{name} has no mmdetection name"
    return mmdet


def check_losses(trajectory, train_oracle, steps, tolerance):
    worst = 0.0
    for step in steps:
        ours, ref = trajectory["recorder"].losses[step], train_oracle["steps"][step]
        total = ours["loss_cls"] + ours["loss_box_reg"]
        deviation = relative(total, float(ref["total"]))
        print(f"step {step} ({ref['phase']}): total {total:.6f} (ref {float(ref['total']):.6f}), {deviation:.1e}")
        worst = max(worst, deviation)
        assert relative(ours["loss_cls"], float(ref["loss_cls_sum"])) <= tolerance(step), step
        assert relative(ours["loss_box_reg"], float(ref["loss_bbox_sum"])) <= tolerance(step), step
    print(f"worst total-loss deviation {worst:.1e}")


def test_losses_of_the_warmup_steps(trajectory, train_oracle):
    assert len(trajectory["recorder"].losses) == train_oracle["meta"]["steps"]
    check_losses(trajectory, train_oracle, range(train_oracle["meta"]["tal_from"]), lambda step: LOSS_RTOL)


def test_losses_of_the_task_aligned_steps(trajectory, train_oracle):
    """Within the rounding envelope (module docstring); the reference's run switches at step 2."""
    steps = range(train_oracle["meta"]["tal_from"], train_oracle["meta"]["steps"])
    assert list(steps) == sorted(TAL_LOSS_RTOL)
    check_losses(trajectory, train_oracle, steps, TAL_LOSS_RTOL.get)


def test_the_task_aligned_steps_are_chaotic(trajectory, train_oracle, e2e_oracle):
    """The control behind the envelope: our own run again with the initial weights moved by 1e-7 (relative, about
    one float32 rounding) keeps the warm-up steps' losses to 1e-5 but moves the task-aligned steps' by more than the
    issue's 1e-4 (measured here: 8e-4 at step 2 and 3e-3 at step 3, where the reference is 1.0e-3 and 2.0e-2 from
    our run)."""
    perturbed = run_trajectory(train_oracle, e2e_oracle, weight_noise=1e-7)["recorder"].losses
    ours = trajectory["recorder"].losses
    tal_from = train_oracle["meta"]["tal_from"]
    for step, (a, b) in enumerate(zip(ours, perturbed)):
        moved = relative(b["loss_cls"], a["loss_cls"])
        to_ref = relative(a["loss_cls"], float(train_oracle["steps"][step]["loss_cls_sum"]))
        print(f"step {step}: the perturbation moves the classification loss by {moved:.1e} (ours vs ref {to_ref:.1e})")
        if step < tal_from:
            assert moved <= 1e-5, step
        else:
            assert moved > LOSS_RTOL, step
            assert moved <= TAL_LOSS_RTOL[step], step


def test_frozen_tensors_are_the_reference_s(trajectory, train_oracle):
    model = trajectory["model"]
    frozen = sorted(theirs(n) for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(train_oracle["meta"]["optimizer"]["frozen"])
    trained = sorted(theirs(n) for n, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(train_oracle["grad_step0_stats"])


def test_optimizer_is_the_reference_s(trajectory, train_oracle):
    """SGD, momentum 0.9, weight decay 1e-4 on every trainable parameter (norms, biases and scales included)."""
    (ref_group,) = train_oracle["meta"]["optimizer"]["groups"]
    optimizer = trajectory["optimizer"]
    assert type(optimizer).__name__ == train_oracle["meta"]["optimizer"]["type"]
    trained = {id(p) for p in trajectory["model"].parameters() if p.requires_grad}
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained <= in_groups
    for group in optimizer.param_groups:
        for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
            assert group[key] == ref_group[key], key


def test_step0_gradients(trajectory, train_oracle):
    ref_stats = train_oracle["grad_step0_stats"]
    grads = {theirs(n): g for n, g in trajectory["recorder"].grads.items()}
    assert sorted(grads) == sorted(ref_stats)
    zero = [name for name in grads if ref_stats[name][2] == 0]
    assert all(torch.count_nonzero(grads[name]) == 0 for name in zero)
    deviations = {n: relative(stats(g)[2].item(), ref_stats[n][2].item()) for n, g in grads.items() if n not in zero}
    worst = max(deviations, key=deviations.get)
    median = np.median(list(deviations.values()))
    print(f"step-0 gradient l2: worst {deviations[worst]:.1e} ({worst}), median {median:.1e}")
    assert deviations[worst] <= GRAD_L2_RTOL


def weight_changes(trajectory, train_oracle):
    """mmdetection name -> our change of the tensor after the 4 steps, for every floating tensor of the state dict."""
    state, initial = trajectory["model"].state_dict(), trajectory["initial"]
    changes = {theirs(n): state[n] - initial[n] for n in state if state[n].is_floating_point()}
    assert sorted(changes) == sorted(train_oracle["delta_stats"])
    return changes


def test_tensors_the_reference_keeps_fixed_do_not_move(trajectory, train_oracle):
    """Frozen stem and res2, every BatchNorm's running statistics: exactly unchanged, as in the reference."""
    fixed = [k for k, v in train_oracle["delta_stats"].items() if v[2] == 0]
    changes = weight_changes(trajectory, train_oracle)
    assert len(fixed) > 100
    for name in fixed:
        assert torch.count_nonzero(changes[name]) == 0, f"{name} moved; the reference keeps it fixed"
    moving = [k for k, v in train_oracle["delta_stats"].items() if v[2] > 0]
    assert all(torch.count_nonzero(changes[name]) > 0 for name in moving)


def test_change_of_every_tensor_after_4_steps(trajectory, train_oracle):
    """Where the reference has the whole tensor (neck, head, norms): ||our change - its change|| / ||its change||;
    elsewhere the l2 norms of the changes. Within the rounding envelope of the task-aligned steps (module docstring):
    the median tensor and the worst."""
    changes, full, deviations = weight_changes(trajectory, train_oracle), train_oracle["final_full"], {}
    init_ref = train_oracle_initial(train_oracle, trajectory)
    for name, delta in changes.items():
        ref_l2 = train_oracle["delta_stats"][name][2].item()
        if ref_l2 == 0:
            continue
        if name in full:
            ref_delta = full[name].double() - init_ref[name].double()
            deviations[name] = ((delta.double() - ref_delta).norm() / ref_delta.norm()).item()
        else:
            deviations[name] = relative(delta.double().norm().item(), ref_l2)
    worst = max(deviations, key=deviations.get)
    median = np.median(list(deviations.values()))
    print(f"change after 4 steps, {len(deviations)} moving tensors: median {median:.1e}, worst {deviations[worst]:.1e}")
    assert median <= DELTA_MEDIAN_RTOL
    assert deviations[worst] <= DELTA_WORST_RTOL


def train_oracle_initial(train_oracle, trajectory):
    """The starting tensors in mmdetection's names (our initial state dict renamed; the oracle's init file)."""
    return {
        theirs(n): v
        for n, v in trajectory["initial"].items()
        if v.is_floating_point() and theirs(n) in train_oracle["final_full"]
    }


def test_learning_rate_of_the_1x_schedule(train_oracle):
    """configs/tood_R_50_1x.py's schedule through Detectron2's LRMultiplier, as the LRScheduler hook runs it."""
    table = train_oracle["lr_schedule_1x"]
    cfg = LazyConfig.load(CONFIG)
    assert cfg.train.iters_per_epoch == table["iters_per_epoch"]
    assert cfg.train.max_iter == table["total_iters"]
    assert cfg.optimizer.lr == table["base_lr"]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    scheduler = LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)
    wanted = dict(zip(table["iters"], table["lr"]))
    worst = 0.0
    for iteration in range(max(wanted) + 1):
        if iteration in wanted:
            lr = optimizer.param_groups[0]["lr"]
            worst = max(worst, relative(lr, wanted[iteration]))
            assert lr == pytest.approx(wanted[iteration], rel=LR_RTOL), iteration
        optimizer.step()
        scheduler.step()
    print(f"learning rate at {len(wanted)} iterations: worst relative deviation {worst:.1e}")
