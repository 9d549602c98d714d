"""The inner training loops: Detectron2's SimpleTrainer / AMPTrainer with a finite-loss check, AMP on any device
(float16 with loss scaling, or bfloat16), and global gradient-norm clipping. Both training paths (LazyConfig:
:func:`tood.engine.do_train`; YAML: :class:`tood.engine.Trainer`) run these."""

import time
from typing import Optional

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..checkpoint import TOODCheckpointer

__all__ = [
    "CheckedAMPTrainer",
    "CheckedSimpleTrainer",
    "add_gradient_clipping",
    "build_trainer",
    "check_losses_finite",
]


def check_losses_finite(loss_dict, iteration, checkpointer=None):
    """Raises FloatingPointError, on every rank, if a loss of any rank is NaN or infinite.

    Called before the optimizer step, so the weights never take a non-finite step. The message names the
    iteration, each rank's losses and the last good checkpoint. The ranks agree through an all-reduce, so that
    none goes on to wait for the others in the next collective.
    """
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in loss_dict.values()]).any().float()
    if comm.get_world_size() > 1:
        dist.all_reduce(bad)
    if not bad.item():
        return
    losses = [", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())]
    if comm.get_world_size() > 1:
        losses = [f"rank {r}: {x}" for r, x in enumerate(comm.all_gather(losses[0]))]
    if checkpointer is not None and checkpointer.has_checkpoint():
        last = f"The last good checkpoint is {checkpointer.get_checkpoint_file()}: continue from it with --resume"
    else:
        last = "No checkpoint was written yet: start again"
    raise FloatingPointError(
        f"Loss is NaN or infinite at iteration {iteration} ({'; '.join(losses)}); the weights did not take this "
        f"step. {last}, with e.g. a lower optimizer.lr, a longer lr_multiplier.warmup_length or "
        "train.clip_grad.enabled=True."
    )


class FiniteLossCheck:
    """Trainer mixin: :func:`check_losses_finite` on every iteration, before the step.

    ``checkpointer`` (set by :func:`build_trainer`) is where the message looks for the last good checkpoint.
    """

    checkpointer = None

    def _write_metrics(self, loss_dict, data_time, prefix=""):
        # Called by the run_step of SimpleTrainer and CheckedAMPTrainer before the optimizer step.
        try:
            check_losses_finite(loss_dict, self.iter, self.checkpointer)
        except FloatingPointError:
            # The last completed iteration: hooks' after_train reads iter + 1 >= max_iter as "training finished"
            # (final checkpoint, final evaluation), which a failure in the last iteration is not.
            self.iter -= 1
            raise
        super()._write_metrics(loss_dict, data_time, prefix)


class CheckedSimpleTrainer(FiniteLossCheck, SimpleTrainer):
    pass


class CheckedAMPTrainer(FiniteLossCheck, AMPTrainer):
    """Detectron2's :class:`AMPTrainer` on any device, in float16 or bfloat16 (v0.6's runs on CUDA only).

    The forward pass and the losses run under ``torch.autocast(device, precision)``; the step is AMPTrainer's. In
    float16 (max 65504) the loss is scaled before the backward pass, and ``torch.amp.GradScaler`` unscales the
    gradients, skips the step (and halves the scale) when any of them is inf or NaN, and updates the scale. bfloat16
    keeps float32's exponent range: its scaler is disabled and the gradients are used as they are. On CPUs with
    bfloat16 units (AVX512-BF16, AMX) wide convolutions run up to ~2x faster in bfloat16; narrow models such as the
    quick start's gain little. float16 on a CPU is for checking the numerics of CUDA's recipe: it is emulated.
    """

    def __init__(self, model, data_loader, optimizer, *, device="cuda", precision=torch.float16):
        device_type = torch.device(device).type
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler)
        self.device_type, self.precision = device_type, precision

    def run_step(self):
        assert self.model.training, "[CheckedAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def load_state_dict(self, state_dict):
        # A checkpoint of a run without a scaler (float32, or bfloat16 before its loop had one) resumes with a fresh
        # scale instead of failing on the missing entry.
        if "grad_scaler" in state_dict:
            super().load_state_dict(state_dict)
        else:
            SimpleTrainer.load_state_dict(self, state_dict)


def build_trainer(
    model,
    data_loader,
    optimizer,
    *,
    amp: bool = False,
    device="cpu",
    precision: Optional[torch.dtype] = None,
    output_dir: Optional[str] = None,
    state=None,
) -> SimpleTrainer:
    """The checked inner loop for ``device``: fp32; with ``amp``, :class:`CheckedAMPTrainer` in ``precision``, by
    default float16 with loss scaling on CUDA and bfloat16 on CPU.

    Args:
        output_dir: where the run's checkpoints go: the trainer gets its :class:`TOODCheckpointer` there
            (``trainer.checkpointer``), which saves the model and ``state``, resumes them
            (:func:`tood.checkpoint.load_weights`) and names the last good checkpoint when a loss is not finite.
        state: what a checkpoint holds beside the model (iteration, optimizer, LR schedule, AMP's grad scaler): the
            trainer that runs the hooks; this trainer if None.
    """
    if not amp:
        trainer = CheckedSimpleTrainer(model, data_loader, optimizer)
    else:
        if precision is None:
            precision = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
        trainer = CheckedAMPTrainer(model, data_loader, optimizer, device=device, precision=precision)
    if output_dir is not None:
        trainer.checkpointer = TOODCheckpointer(model, output_dir, trainer=trainer if state is None else state)
    return trainer


def add_gradient_clipping(optimizer, max_norm: float, norm_type: float = 2.0):
    """Makes ``optimizer.step`` first clip the norm of all gradients together and log it as ``grad_norm``.

    Detectron2's clipping class with a global clipper (mmdetection's ``grad_clip``; Detectron2's own config option
    clips each parameter separately). Inside ``step`` it sees true gradients under AMP too: GradScaler unscales
    before calling it, and skips it when they overflowed.
    """

    def clip(params):
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)
        get_event_storage().put_scalar("grad_norm", norm.item(), smoothing_hint=False)

    optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(type(optimizer), global_clipper=clip)
    return optimizer
