"""Where a detector's time goes: ``torch.profiler`` on one training iteration and one inference (CPU, fp32), each
op's own time charged to the part of the model (:data:`PROFILE_PARTS`) that runs it; backward ops are charged to
the part whose forward op created them."""

import bisect
import sys
from collections import defaultdict
from contextlib import ExitStack
from functools import wraps
from typing import Dict, Iterator, Optional, Sequence, Tuple
from unittest import mock

import torch
from detectron2.utils.events import EventStorage
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from .detectors import DEFAULTS, Inference, TrainStep, build_models, make_batch

__all__ = ["PROFILE_PARTS", "mark_parts", "part_times", "profile_models"]

# Parts of a model: (label, attribute paths from the model). The innermost part that encloses an op gets its time;
# paths a model lacks are skipped. "tood.head:NAME" is a function of TOOD's head module.
PROFILE_PARTS = [
    ("preprocess (normalise, pad)", ["preprocess_image"]),
    ("backbone: ResNet", ["backbone.bottom_up"]),
    ("backbone: FPN", ["backbone"]),
    ("head: conv towers", ["head.inter_convs", "head.cls_subnet", "head.bbox_subnet"]),
    ("head: task decomposition", ["head.cls_decomp", "head.reg_decomp"]),
    ("head: class scores", ["head.cls_score", "head.alignment_map", "tood.head:sigmoid_geometric_mean"]),
    ("head: boxes", ["head.bbox_pred", "head._decode_boxes"]),
    ("head: box alignment (offsets, sampling)", ["head.offset_map", "tood.head:align_boxes"]),
    ("head: rest", ["head"]),
    ("anchors / priors", ["anchor_generator", "head.prior_points", "head.prior_boxes"]),
    ("assignment", ["criterion.tal_assigner", "criterion.atss_assigner", "label_anchors"]),
    ("targets", ["criterion.get_targets"]),
    ("losses", ["criterion.anchor_losses", "losses"]),
    ("training: rest (flatten, normalise)", ["forward_training"]),
    ("post-processing", ["forward_inference"]),
]
_SGD_STEP = "SGD step"  # the optimizer step of a TrainStep, marked by profile_models
_PART = "part: "  # prefix of the profiler ranges that mark the parts
_BACKWARD = "autograd::engine::evaluate_function"  # the profiler's range around each autograd node's backward


def _scoped(label, fn):
    """``fn`` inside the profiler range of part ``label``."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(_PART + label):
            return fn(*args, **kwargs)

    return wrapper


def _resolve(root, path):
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p, None)
    return root, name, getattr(root, name, None)


def mark_parts(model: nn.Module, stack: ExitStack) -> None:
    """Marks the parts of ``model`` (:data:`PROFILE_PARTS`) with profiler ranges, undone when ``stack`` closes."""

    def enter(label):
        def hook(module, inputs):
            module._benchmark_ranges.append(record_function(_PART + label).__enter__())

        return hook

    def leave(module, inputs, outputs):
        module._benchmark_ranges.pop().__exit__(None, None, None)

    for label, paths in PROFILE_PARTS:
        for path in paths:
            if ":" in path:
                module_name, name = path.split(":")
                stack.enter_context(
                    mock.patch(f"{module_name}.{name}", _scoped(label, getattr(sys.modules[module_name], name)))
                )
                continue
            owner, name, target = _resolve(model, path)
            if target is None:
                continue
            if isinstance(target, nn.Module):
                for module in target.children() if isinstance(target, nn.ModuleList) else [target]:
                    module._benchmark_ranges = []
                    stack.callback(module.register_forward_pre_hook(enter(label)).remove)
                    stack.callback(module.register_forward_hook(leave).remove)
            else:
                # An instance attribute shadows the method (or callable object) until removed.
                setattr(owner, name, _scoped(label, target))
                stack.callback(delattr, owner, name)


def part_times(events) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Milliseconds per part, forward and backward, from the profiler events of a run with marked parts.

    Each op's own time goes to the innermost part enclosing it; an op of the backward pass goes to the part of the
    forward op that created its autograd node: the last forward op that recorded the node's sequence number (ops
    that create no node record the next number too), or where none did (nodes made inside a TorchScript function,
    e.g. RetinaNet's focal loss) the last one that recorded an earlier number. Unmarked ops go to "rest".
    """

    def enclosing(event):
        while event is not None and not event.name.startswith((_PART, _BACKWARD)):
            event = event.cpu_parent
        return event

    def label(range_event):
        return range_event.name[len(_PART) :] if range_event is not None else "rest"

    forward_part = {}
    for event in events:  # in order of start
        outer = enclosing(event)
        if event.sequence_nr >= 0 and (outer is None or not outer.name.startswith(_BACKWARD)):
            forward_part[event.sequence_nr] = label(outer)
    numbers = sorted(forward_part)

    def node_part(number):
        earlier = bisect.bisect_right(numbers, number)
        return forward_part[numbers[earlier - 1]] if number >= 0 and earlier else "rest"

    forward, backward = defaultdict(float), defaultdict(float)
    for event in events:
        outer = enclosing(event)
        if outer is not None and outer.name.startswith(_BACKWARD):
            backward[node_part(outer.sequence_nr)] += event.self_cpu_time_total / 1000
        else:
            forward[label(outer)] += event.self_cpu_time_total / 1000
    return forward, backward


def profile_models(
    config_file: str,
    opts: Sequence[str] = (),
    size: Optional[Tuple[int, int]] = None,
    train_batch: Optional[int] = None,
    num_gts: int = 8,
    tood_phase: str = "tal",
    test_score_thresh: Optional[float] = None,
) -> Iterator[str]:
    """Yields, for TOOD of ``config_file`` and RetinaNet (:func:`~benchmarks.detectors.build_models`) on CPU,
    a Markdown table of the milliseconds of each part in a training iteration of ``train_batch`` images and a
    batch-1 inference, on ``size`` (H, W) images (default: the CPU :data:`~benchmarks.detectors.DEFAULTS`)."""
    default_size, _, default_train_batch, _ = DEFAULTS["cpu"]
    size, train_batch = size or default_size, train_batch or default_train_batch
    models = build_models(config_file, opts, tood_phase, torch.device("cpu"), test_score_thresh)
    num_classes = models["TOOD"].num_classes
    for name, model in models.items():
        step = TrainStep(model, make_batch(train_batch, size, num_gts, num_classes, model.device), False)
        runs = {
            "training": step,
            "inference": Inference(model, make_batch(1, size, num_gts, num_classes, model.device), False),
        }
        times = {}
        for kind, fn in runs.items():
            with EventStorage(0):
                fn()  # warm-up, unprofiled
                with ExitStack() as stack:
                    mark_parts(model, stack)
                    stack.enter_context(
                        mock.patch.object(step.optimizer, "step", _scoped(_SGD_STEP, step.optimizer.step))
                    )
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        fn()
            times[kind] = part_times(prof.events())
        (train_fwd, train_bwd), (infer, _) = times["training"], times["inference"]
        labels = [label for label, _ in PROFILE_PARTS] + [_SGD_STEP, "rest"]
        labels = list(dict.fromkeys(k for k in labels if train_fwd[k] or train_bwd[k] or infer[k]))
        totals = [sum(d.values()) for d in (train_fwd, train_bwd, infer)]
        lines = [
            f"{name}, CPU ({torch.get_num_threads()} threads), fp32, {size[0]}x{size[1]}: profiled ms per part, "
            f"training batch {train_batch} and inference batch 1",
            "",
            "| part | training forward | training backward | training % | inference | inference % |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label in labels + ["total"]:
            fwd, bwd, inf = totals if label == "total" else (train_fwd[label], train_bwd[label], infer[label])
            lines.append(
                f"| {label} | {fwd:.0f} | {bwd:.0f} | {100 * (fwd + bwd) / (totals[0] + totals[1]):.1f} | "
                f"{inf:.0f} | {100 * inf / totals[2]:.1f} |"
            )
        yield "\n".join(lines)
