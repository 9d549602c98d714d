"""Size, speed and memory of TOOD next to Detectron2's RetinaNet R-50-FPN, both built and run in one process.

For each model: parameters; FLOPs of the dense network (backbone, FPN, head) as fvcore counts them (one
multiply-add is one flop; elementwise ops, post-processing and ops fvcore does not know, such as the DCN configs'
deform_conv2d, count 0); inference latency and images/s per batch size; time and extra peak memory of a training
iteration (Detectron2's trainer: forward, backward, SGD step); on each device and precision; with the ratio
TOOD / RetinaNet. The two models' timed runs alternate (:func:`benchmarks.timing.median_times`), so that load
on the machine hits both alike; peak memory is :func:`benchmarks.timing.peak_memory_mb` of one more training
iteration after the timed ones.

Weights are as initialised (random), images random, every training image has ``num_gts`` random boxes, and TOOD
trains in one assignment phase throughout. Inputs already sit on the device.
"""

import itertools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2 import model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.solver.build import get_default_optimizer_params
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis, parameter_count
from torch import nn

from tood.engine.train_loop import build_trainer

from .timing import median_times, peak_memory_mb

__all__ = [
    "DEFAULTS",
    "RETINANET_CONFIG",
    "Inference",
    "TrainStep",
    "benchmark_device",
    "build_models",
    "compare_with_retinanet",
    "count_flops",
    "device_description",
    "make_batch",
    "model_size_table",
]

# Detectron2's RetinaNet R-50-FPN 1x: common/models/retinanet.py with the stem and res2 frozen (freeze_at=2), as TOOD's.
RETINANET_CONFIG = "COCO-Detection/retinanet_R_50_FPN_1x.py"
# Per device type: (image size, inference batch sizes, training batch size, timed iterations). On CUDA the reference's
# input size; on CPU cut to run in a few minutes on 2 cores.
DEFAULTS = {"cuda": ((800, 1333), [1, 8], 2, 20), "cpu": ((320, 512), [1, 2], 2, 3)}


def build_models(
    config_file: str, opts: Sequence[str], tood_phase: str, device, test_score_thresh: Optional[float] = None
) -> Dict[str, DenseDetector]:
    """{"TOOD": from ``config_file`` with the ``opts`` overrides, "RetinaNet": Detectron2's, with as many classes}
    on ``device``, seeded alike. TOOD assigns with ``tood_phase`` ("tal" or "atss", its warm-up) throughout;
    ``test_score_thresh`` sets both models' inference threshold (0: every location and class are candidates)."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(config_file)), list(opts))
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


def make_batch(batch_size: int, size: Tuple[int, int], num_gts: int, num_classes: int, device, seed: int = 0):
    """Model inputs: random images ``(3, H, W)`` in [0, 255] with ``num_gts`` random boxes each, 16 px to half
    the image, log-uniform."""
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


class _DenseNetwork(nn.Module):
    """Backbone and head of a Detectron2 dense detector: what FLOPs are counted for."""

    def __init__(self, detector: DenseDetector):
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head
        self.in_features = detector.head_in_features

    def forward(self, images):
        features = self.backbone(images)
        return self.head([features[f] for f in self.in_features])


def count_flops(model: DenseDetector, size: Tuple[int, int]) -> Dict[str, float]:
    """GFLOPs of the dense network on one ``size`` image: {"total", "backbone: ResNet", "backbone: FPN", "head"}."""
    h, w = size
    div = model.backbone.size_divisibility
    images = torch.zeros(1, 3, -(-h // div) * div, -(-w // div) * div, device=model.device)
    flops = FlopCountAnalysis(_DenseNetwork(model).eval(), images)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    with torch.no_grad():
        gflops = {k: v / 1e9 for k, v in flops.by_module().items()}
    return {
        "total": gflops[""],
        "backbone: ResNet": gflops["backbone.bottom_up"],
        "backbone: FPN": gflops["backbone"] - gflops["backbone.bottom_up"],
        "head": gflops["head"],
    }


class TrainStep:
    """One training iteration of ``model`` on ``batch``, run by TOOD's training loop (``build_trainer``: fp32, or
    with ``amp`` fp16 + loss scaling on CUDA, bfloat16 on CPU; it stops on a non-finite loss) with the reference's
    SGD at learning rate 0: the step costs what it costs at any rate, and the random-weight models, trained on the
    same batch again and again without warm-up, would otherwise diverge within a few steps. Call it inside an
    ``EventStorage``: the trainer logs the losses."""

    def __init__(self, model: DenseDetector, batch: List[dict], amp: bool):
        self.optimizer = torch.optim.SGD(get_default_optimizer_params(model), lr=0.0, momentum=0.9, weight_decay=1e-4)
        self.trainer = build_trainer(model, itertools.repeat(batch), self.optimizer, amp=amp, device=model.device)

    def __call__(self):
        self.trainer.model.train()
        self.trainer.run_step()


class Inference:
    """One inference of ``model`` on the images of ``batch``; with ``amp``, fp16 autocast on CUDA, bfloat16 on CPU
    (as the training loop)."""

    def __init__(self, model: DenseDetector, batch: List[dict], amp: bool):
        self.model, self.batch, self.amp = model, [{"image": x["image"]} for x in batch], amp

    @torch.no_grad()
    def __call__(self):
        self.model.eval()
        device = self.model.device.type
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        with torch.autocast(device, dtype=dtype, enabled=self.amp):
            self.model(self.batch)


class _Table:
    """Markdown rows of TOOD and RetinaNet figures and their ratio, under a title."""

    def __init__(self, title: str):
        self.lines = [title, "", "| measurement | TOOD | RetinaNet | TOOD / RetinaNet |", "|---|---:|---:|---:|"]

    def row(self, label: str, tood_value, retinanet_value, fmt: str = "{:.1f}"):
        if tood_value is None or retinanet_value is None:
            self.lines.append(f"| {label} | n/a | n/a | n/a |")
            return
        self.lines.append(
            f"| {label} | {fmt.format(tood_value)} | {fmt.format(retinanet_value)} | "
            f"{tood_value / retinanet_value:.2f} |"
        )

    def __str__(self):
        return "\n".join(self.lines)


def model_size_table(models: Dict[str, DenseDetector], flops_size: Tuple[int, int]) -> str:
    """The parameter counts and the FLOPs of the dense network on one ``flops_size`` image."""
    table = _Table("Model size (random weights)")
    totals = [parameter_count(m)[""] for m in models.values()]
    table.row("parameters (M)", *(c / 1e6 for c in totals), "{:.2f}")
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in models.values()]
    table.row("trainable parameters (M)", *(c / 1e6 for c in trainable), "{:.2f}")
    flops = [count_flops(m, flops_size) for m in models.values()]
    for part in flops[0]:
        table.row(f"GFLOPs {flops_size[0]}x{flops_size[1]} (fvcore): {part}", *(f[part] for f in flops))
    return str(table)


def device_description(device: torch.device) -> str:
    """The GPU's name, or "CPU (N threads)": where a benchmark ran, for its table's title."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def benchmark_device(
    models: Dict[str, DenseDetector],
    device,
    precision: str,
    size: Tuple[int, int],
    batch_sizes: Sequence[int],
    train_batch: int,
    iters: int,
    warmup: int,
    num_gts: int,
) -> str:
    """The inference and training table of ``models`` on ``device`` in ``precision`` ("fp32" or "amp"): median
    latency and images / s of each inference batch size, median time and extra peak memory of a training
    iteration of ``train_batch`` images, on ``size`` (H, W) images; ``iters`` timed rounds after ``warmup``."""
    device = torch.device(device)
    amp = precision == "amp"
    num_classes = models["TOOD"].num_classes
    where, amp_dtype = device_description(device), "float16" if device.type == "cuda" else "bfloat16"
    table = _Table(
        f"{where}, {'AMP ' + amp_dtype if amp else 'fp32'}, {size[0]}x{size[1]}, "
        f"median of {iters} after {warmup} warm-up"
    )
    for batch_size in batch_sizes:
        batch = make_batch(batch_size, size, num_gts, num_classes, device)
        runs = {k: Inference(m, batch, amp) for k, m in models.items()}
        latency = median_times(runs, iters, warmup, device)
        table.row(f"inference batch {batch_size}: ms / batch", *(1000 * latency[k] for k in models))
        table.row(f"inference batch {batch_size}: images / s", *(batch_size / latency[k] for k in models), "{:.2f}")
    batch = make_batch(train_batch, size, num_gts, num_classes, device)
    steps = {k: TrainStep(m, batch, amp) for k, m in models.items()}
    with EventStorage(0):
        seconds = median_times(steps, iters, warmup, device)
        # Apart from the timed runs: giving memory back to the system before each call would slow the call down.
        memory = {k: peak_memory_mb(step, device) for k, step in steps.items()}
    table.row(f"training batch {train_batch}: s / iteration", *(seconds[k] for k in models), "{:.3f}")
    measure = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    table.row(f"training batch {train_batch}: extra peak MB ({measure})", *(memory[k] for k in models), "{:.0f}")
    return str(table)


def compare_with_retinanet(
    config_file: str,
    opts: Sequence[str] = (),
    devices: Optional[Sequence[str]] = None,
    precisions: Optional[Sequence[str]] = None,
    size: Optional[Tuple[int, int]] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    train_batch: Optional[int] = None,
    iters: Optional[int] = None,
    warmup: int = 1,
    flops_size: Tuple[int, int] = (800, 1333),
    num_gts: int = 8,
    tood_phase: str = "tal",
    test_score_thresh: Optional[float] = None,
) -> Iterator[str]:
    """TOOD of ``config_file`` against RetinaNet: yields :func:`model_size_table`, then the
    :func:`benchmark_device` table of each device and precision as it is measured.

    Args:
        devices: default "cpu", and "cuda" where available.
        precisions: "fp32" and/or "amp"; default fp32 on CPU, both on CUDA.
        size, batch_sizes, train_batch, iters: default :data:`DEFAULTS` of the device type.
        others: see :func:`build_models`, :func:`benchmark_device`.
    """
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for i, device in enumerate(torch.device(d) for d in devices):
        models = build_models(config_file, opts, tood_phase, device, test_score_thresh)
        if i == 0:
            yield model_size_table(models, flops_size)
        default_size, default_batch_sizes, default_train_batch, default_iters = DEFAULTS[device.type]
        for precision in precisions or (["fp32", "amp"] if device.type == "cuda" else ["fp32"]):
            yield benchmark_device(
                models,
                device,
                precision,
                size or default_size,
                batch_sizes or default_batch_sizes,
                train_batch or default_train_batch,
                iters or default_iters,
                warmup,
                num_gts,
            )
        del models
