#!/usr/bin/env python
"""Size, speed and memory of TOOD next to Detectron2's RetinaNet R-50-FPN, both built and run in one process.

For each model: parameters; FLOPs of the dense network (backbone, FPN, head) at 800x1333 as fvcore counts them
(one multiply-add is one flop; elementwise ops, post-processing and ops fvcore does not know, such as the DCN
configs' deform_conv2d, count 0); inference latency and images/s per batch size; time and extra peak memory of a
training iteration (forward, backward, SGD step); on each device and precision; with the ratio TOOD / RetinaNet.
The two models' timed runs alternate (TOOD, RetinaNet, TOOD, ...) after ``--warmup`` untimed rounds and medians
are reported, so that load on the machine hits both alike.

Weights are as initialised (random), images random, every training image has ``--gts`` random boxes, and TOOD
trains in its task-aligned phase (``--tood-phase atss``: its warm-up). Inputs already sit on the device. Random
weights score almost no location above the inference threshold, so post-processing has next to nothing to do;
``--test-score-thresh 0`` gives it the most (every location and class are candidates).

Peak memory is what one more training iteration, after the timed ones, needs beyond what is held before it
(weights, optimizer state): on CUDA from ``torch.cuda.max_memory_allocated`` (bytes in tensors); on CPU the peak
resident set size (Linux's VmHWM, reset through /proc/self/clear_refs) minus the resident size before the
iteration, once glibc has given free memory back (``malloc_trim``). So on CPU it includes the allocator's overhead,
and Linux keeps RSS only approximately (to some tens of MB).

The last table times ``TaskAlignedAssigner`` on tools/benchmark_assigner.py's inputs (that tool prints the full
table, with memory). ``--profile`` instead profiles one training iteration and one inference of each model on CPU
(``torch.profiler``) and prints the time of each part of the model; backward ops are charged to the part whose
forward op created them.

Defaults on CUDA are the issue's: 800x1333, inference at batch 1 and 8, training at batch 2, 20 iterations. On
CPU they are cut to run in a few minutes on 2 cores: 320x512, inference at batch 1 and 2, 3 iterations. On a
loaded machine ``--threads 1`` gives steadier figures (threads that wait for each other wait for the scheduler).

Examples::

    tools/benchmark.py                                    # CPU, and CUDA with and without AMP where available
    tools/benchmark.py --device cpu --size 800x1333 --batch-sizes 1 8 --iters 5   # the issue's sizes on CPU
    tools/benchmark.py --device cuda --config-file configs/tood_R_101_2x_ms.py
    tools/benchmark.py --profile --size 512x768
"""

import argparse
import bisect
import ctypes
import gc
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from functools import wraps
from pathlib import Path
from unittest import mock

import benchmark_assigner
import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.solver.build import get_default_optimizer_params
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import tood  # noqa: F401  registers TOOD's config resolvers
from tood.assigner import TaskAlignedAssigner

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = next(
    p for p in (REPO_ROOT / "configs/tood_R_50_1x.py", REPO_ROOT / "configs/common/models/tood.py") if p.is_file()
)
# Detectron2's RetinaNet R-50-FPN 1x: common/models/retinanet.py with the stem and res2 frozen (freeze_at=2), as TOOD's.
RETINANET_CONFIG = "COCO-Detection/retinanet_R_50_FPN_1x.py"
FLOPS_SIZE = "800x1333"
# (size, inference batch sizes, training batch size, timed iterations) per device type.
DEFAULTS = {"cuda": ("800x1333", [1, 8], 2, 20), "cpu": ("320x512", [1, 2], 2, 3)}

# Parts of a model for --profile: (label, attribute paths from the model). The innermost part that encloses an op
# gets its time; paths a model lacks are skipped. "tood.head:NAME" is a function of TOOD's head module.
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
_PART = "part: "  # prefix of the profiler ranges that mark the parts
_BACKWARD = "autograd::engine::evaluate_function"  # the profiler's range around each autograd node's backward


def parse_size(text):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def build_models(config_file, opts, tood_phase, device, test_score_thresh=None):
    """TOOD from ``config_file`` and Detectron2's RetinaNet R-50-FPN with as many classes, on ``device``."""
    cfg = LazyConfig.load(str(config_file))
    cfg = LazyConfig.apply_overrides(cfg, opts)
    # The warm-up length is a fraction of the schedule in the configs: here TOOD is in one phase throughout.
    cfg.model.tal_start_iter = 0 if tood_phase == "tal" else 2**62
    retinanet = model_zoo.get_config(RETINANET_CONFIG).model
    retinanet.num_classes = cfg.model.num_classes
    if test_score_thresh is not None:
        cfg.model.test_score_thresh = retinanet.test_score_thresh = test_score_thresh
    models = {}
    for name, model_cfg in (("TOOD", cfg.model), ("RetinaNet", retinanet)):
        torch.manual_seed(0)
        models[name] = instantiate(model_cfg).to(device)
    return models


def make_batch(batch_size, size, num_gts, num_classes, device, seed=0):
    """Random images ``(3, H, W)`` in [0, 255] with ``num_gts`` random boxes each, 16 px to half the image."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(batch_size):
        side = 16 * (min(h, w) / 32) ** torch.rand(num_gts, 1, generator=gen)  # log-uniform
        wh = side * torch.cat([torch.ones(num_gts, 1), 0.5 + 1.5 * torch.rand(num_gts, 1, generator=gen)], dim=1)
        xy = torch.rand(num_gts, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(num_classes, (num_gts,), generator=gen)
        image = torch.rand(3, h, w, generator=gen) * 255
        batch.append({"image": image.to(device), "instances": instances.to(device)})
    return batch


class DenseNetwork(nn.Module):
    """Backbone and head of a Detectron2 dense detector: what FLOPs are counted for."""

    def __init__(self, detector):
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head
        self.in_features = detector.head_in_features

    def forward(self, images):
        features = self.backbone(images)
        return self.head([features[f] for f in self.in_features])


def count_flops(model, size):
    """GFLOPs of the dense network on one ``size`` image: {"total", "backbone: ResNet", "backbone: FPN", "head"}."""
    h, w = size
    div = model.backbone.size_divisibility
    images = torch.zeros(1, 3, -(-h // div) * div, -(-w // div) * div, device=model.device)
    flops = FlopCountAnalysis(DenseNetwork(model).eval(), images)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    with torch.no_grad():
        by_module = flops.by_module()
    gflops = {k: v / 1e9 for k, v in by_module.items()}
    return {
        "total": gflops[""],
        "backbone: ResNet": gflops["backbone.bottom_up"],
        "backbone: FPN": gflops["backbone"] - gflops["backbone.bottom_up"],
        "head": gflops["head"],
    }


class PeakMemory:
    """Extra peak memory (MB) of the code run between ``start()`` and ``stop()``; None where it cannot be measured."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        if self.libc is None:
            self.base = None
            return
        self.libc.malloc_trim(0)
        self.base = self._status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.base = None

    def stop(self):
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.base is None:
            return None
        return (self._status_kb("VmHWM") - self.base) / 2**10

    @staticmethod
    def _status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def autocast(device, amp):
    """fp16 autocast on CUDA, bfloat16 on CPU (as tools/train_net.py), or nothing."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


class TrainStep:
    """One training iteration as Detectron2's (AMP)Trainer runs it: losses, backward, SGD step."""

    def __init__(self, model, batch, amp):
        self.model, self.batch, self.amp = model, batch, amp
        # The reference's SGD; the learning rate does not change the cost of a step.
        self.optimizer = torch.optim.SGD(get_default_optimizer_params(model), lr=0.01, momentum=0.9, weight_decay=1e-4)
        # Loss scaling for fp16; bfloat16 on CPU has float32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp and model.device.type == "cuda")

    def __call__(self):
        self.model.train()
        with autocast(self.model.device, self.amp):
            losses = self.model(self.batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        with record_function(_PART + "SGD step"):
            self.scaler.step(self.optimizer)
        self.scaler.update()


class Inference:
    def __init__(self, model, batch, amp):
        self.model, self.batch, self.amp = model, [{"image": x["image"]} for x in batch], amp

    @torch.no_grad()
    def __call__(self):
        self.model.eval()
        with autocast(self.model.device, self.amp):
            self.model(self.batch)


def run_interleaved(runs, iters, warmup, device):
    """Calls each of ``runs`` (name -> callable) in turn, ``warmup + iters`` rounds.

    Returns:
        name -> seconds of each timed call.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in runs}
    for i in range(warmup + iters):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def peak_memory(runs, device):
    """name -> extra peak MB of one more call of each of ``runs`` (apart from the timed ones: giving memory back
    to the system before each call would slow the call down)."""
    peak = PeakMemory(device)
    result = {}
    for name, fn in runs.items():
        peak.start()
        fn()
        result[name] = peak.stop()
    return result


class Table:
    """A Markdown table of TOOD and RetinaNet figures and their ratio."""

    def __init__(self, title):
        print(f"\n{title}\n")
        print("| measurement | TOOD | RetinaNet | TOOD / RetinaNet |")
        print("|---|---:|---:|---:|")

    def row(self, label, tood_value, retinanet_value, fmt="{:.1f}"):
        if tood_value is None or retinanet_value is None:
            print(f"| {label} | n/a | n/a | n/a |")
            return
        print(
            f"| {label} | {fmt.format(tood_value)} | {fmt.format(retinanet_value)} | "
            f"{tood_value / retinanet_value:.2f} |"
        )


def print_model_size(models, flops_size):
    """Prints the parameter counts and the FLOPs of the dense network on one ``flops_size`` image."""
    table = Table("Model size (random weights)")
    for label, trainable_only in (("parameters (M)", False), ("trainable parameters (M)", True)):
        counts = [
            sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only) for m in models.values()
        ]
        table.row(label, *(c / 1e6 for c in counts), "{:.2f}")
    flops = [count_flops(m, flops_size) for m in models.values()]
    for part in flops[0]:
        table.row(f"GFLOPs {flops_size[0]}x{flops_size[1]} (fvcore): {part}", *(f[part] for f in flops))


def benchmark_device(models, device, precisions, size, batch_sizes, train_batch, iters, warmup, num_gts):
    """Prints the inference and training table of ``device`` for each precision."""
    num_classes = models["TOOD"].num_classes
    for precision in precisions:
        amp = precision == "amp"
        if device.type == "cuda":
            where, amp_dtype = torch.cuda.get_device_name(device), "float16"
        else:
            where, amp_dtype = f"CPU ({torch.get_num_threads()} threads)", "bfloat16"
        table = Table(
            f"{where}, {'AMP ' + amp_dtype if amp else 'fp32'}, {size[0]}x{size[1]}, "
            f"median of {iters} after {warmup} warm-up"
        )
        for batch_size in batch_sizes:
            batch = make_batch(batch_size, size, num_gts, num_classes, device)
            times = run_interleaved({k: Inference(m, batch, amp) for k, m in models.items()}, iters, warmup, device)
            latency = {k: statistics.median(t) for k, t in times.items()}
            table.row(f"inference batch {batch_size}: ms / batch", *(1000 * latency[k] for k in models))
            table.row(f"inference batch {batch_size}: images / s", *(batch_size / latency[k] for k in models), "{:.2f}")
        batch = make_batch(train_batch, size, num_gts, num_classes, device)
        steps = {k: TrainStep(m, batch, amp) for k, m in models.items()}
        times = run_interleaved(steps, iters, warmup, device)
        table.row(
            f"training batch {train_batch}: s / iteration", *(statistics.median(times[k]) for k in models), "{:.3f}"
        )
        memory = peak_memory(steps, device)
        measure = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
        table.row(f"training batch {train_batch}: extra peak MB ({measure})", *(memory[k] for k in models), "{:.0f}")


def benchmark_assigner_table(num_gts_list, repeats):
    """TaskAlignedAssigner vs the per-image reference on tools/benchmark_assigner.py's inputs (time only)."""
    assigner = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)
    print(
        f"\nTaskAlignedAssigner, CPU ({torch.get_num_threads()} threads), batch 2, 80 classes, median of {repeats}"
        " (tools/benchmark_assigner.py: inputs, reference, and memory)\n"
    )
    print("| anchors | GTs | ours ms | per-image reference ms | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for num_gts in num_gts_list:
        inputs = benchmark_assigner.make_inputs(num_gts)
        ours_ms, _ = benchmark_assigner.time_ms(lambda: assigner(*inputs), repeats)  # noqa: B023
        ref_ms, _ = benchmark_assigner.time_ms(lambda: benchmark_assigner.reference_assign(*inputs), repeats)  # noqa: B023
        print(f"| {inputs[0].shape[1]} | {num_gts} | {ours_ms:.1f} | {ref_ms:.1f} | {ref_ms / ours_ms:.1f}x |")


def _resolve(root, path):
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p, None)
    return root, name, getattr(root, name, None)


def mark_parts(model, stack):
    """Marks the parts of ``model`` (PROFILE_PARTS) with profiler ranges, undone when ``stack`` closes."""

    def scoped(label, fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            with record_function(_PART + label):
                return fn(*args, **kwargs)

        return wrapper

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
                    mock.patch(f"{module_name}.{name}", scoped(label, getattr(sys.modules[module_name], name)))
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
                setattr(owner, name, scoped(label, target))
                stack.callback(delattr, owner, name)


def part_times(events):
    """Milliseconds per part, forward and backward, from a profile of marked parts.

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


def profile_models(models, size, train_batch, num_gts):
    """Prints, per model, the milliseconds of each part in a training iteration and a batch-1 inference (CPU)."""
    num_classes = models["TOOD"].num_classes
    for name, model in models.items():
        runs = {
            "training": TrainStep(model, make_batch(train_batch, size, num_gts, num_classes, model.device), False),
            "inference": Inference(model, make_batch(1, size, num_gts, num_classes, model.device), False),
        }
        times = {}
        for kind, fn in runs.items():
            fn()  # warm-up, unprofiled
            with ExitStack() as stack:
                mark_parts(model, stack)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
            times[kind] = part_times(prof.events())
        (train_fwd, train_bwd), (infer, _) = times["training"], times["inference"]
        labels = [label for label, _ in PROFILE_PARTS] + ["SGD step", "rest"]
        labels = list(dict.fromkeys(k for k in labels if train_fwd[k] or train_bwd[k] or infer[k]))
        totals = [sum(d.values()) for d in (train_fwd, train_bwd, infer)]
        print(
            f"\n{name}, CPU ({torch.get_num_threads()} threads), fp32, {size[0]}x{size[1]}: profiled ms per part, "
            f"training batch {train_batch} and inference batch 1\n"
        )
        print("| part | training forward | training backward | training % | inference | inference % |")
        print("|---|---:|---:|---:|---:|---:|")
        for label in labels + ["total"]:
            fwd, bwd, inf = totals if label == "total" else (train_fwd[label], train_bwd[label], infer[label])
            print(
                f"| {label} | {fwd:.0f} | {bwd:.0f} | {100 * (fwd + bwd) / (totals[0] + totals[1]):.1f} | "
                f"{inf:.0f} | {100 * inf / totals[2]:.1f} |"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG), help="TOOD LazyConfig")
    parser.add_argument("--device", nargs="+", help="cpu and/or cuda (default: cpu, and cuda where available)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "amp"], help="default: fp32 on CPU, both on CUDA")
    parser.add_argument("--size", help="HxW of the timed images (default: 800x1333 on CUDA, 320x512 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="inference (default: 1 8 on CUDA, 1 2 on CPU)")
    parser.add_argument("--train-batch", type=int, help="training batch (default: 2)")
    parser.add_argument("--iters", type=int, help="timed rounds (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--flops-size", default=FLOPS_SIZE, help="HxW of the FLOPs count")
    parser.add_argument("--gts", type=int, default=8, help="ground-truth boxes per training image")
    parser.add_argument("--tood-phase", choices=["tal", "atss"], default="tal", help="TOOD's assignment phase")
    parser.add_argument(
        "--test-score-thresh",
        type=float,
        help="both models' inference score threshold (0: the post-processing's worst case, 1000 candidates a level)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--assigner-gts", type=int, nargs="*", default=[10, 100], help="GT counts; none: skip")
    parser.add_argument("--profile", action="store_true", help="profile the parts on CPU instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with EventStorage(0):  # the detectors log to the event storage while training
        if args.profile:
            cpu = torch.device("cpu")
            models = build_models(args.config_file, args.opts, args.tood_phase, cpu, args.test_score_thresh)
            size, _, train_batch, _ = DEFAULTS["cpu"]
            profile_models(models, parse_size(args.size or size), args.train_batch or train_batch, args.gts)
            return
        print(f"TOOD: {' '.join([args.config_file, *args.opts])}; RetinaNet: Detectron2's {RETINANET_CONFIG}")
        devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
        for i, device in enumerate(torch.device(d) for d in devices):
            models = build_models(args.config_file, args.opts, args.tood_phase, device, args.test_score_thresh)
            if i == 0:
                print_model_size(models, parse_size(args.flops_size))
            size, batch_sizes, train_batch, iters = DEFAULTS[device.type]
            benchmark_device(
                models,
                device,
                args.precision or (["fp32", "amp"] if device.type == "cuda" else ["fp32"]),
                parse_size(args.size or size),
                args.batch_sizes or batch_sizes,
                args.train_batch or train_batch,
                args.iters or iters,
                args.warmup,
                args.gts,
            )
            del models
    if args.assigner_gts:
        benchmark_assigner_table(args.assigner_gts, repeats=3)


if __name__ == "__main__":
    main()
