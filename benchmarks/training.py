"""Training speed of variants of one detector config, side by side: what a change of precision, memory format,
image size, batch or config costs or saves per iteration, measured in one process.

Every combination of the axes is a :class:`TrainingVariant`: its own model (the config with the variant's
overrides, same seed) and batch, trained by the same loop as :class:`~benchmarks.detectors.TrainStep` (fp32,
or with ``amp`` bfloat16 autocast on CPU and fp16 on CUDA). The variants' timed iterations alternate
(:func:`benchmarks.timing.median_times`), so that a change of load on a shared machine hits them alike; each
is reported as the median seconds per iteration, images per second and its ratio to the first variant.
"""

import itertools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.events import EventStorage

from .detectors import TrainStep, device_description, make_batch
from .timing import median_times

__all__ = ["TrainingVariant", "training_variants", "training_speed_table"]


@dataclass(frozen=True)
class TrainingVariant:
    """One way to train a config: ``opts`` (``key=value`` overrides) named ``config_name``, in ``precision``
    ("fp32" or "amp") and ``memory_format`` ("contiguous" or "channels_last"), on ``batch`` images of ``size``
    (H, W)."""

    config_name: str
    opts: Tuple[str, ...]
    precision: str
    memory_format: str
    size: Tuple[int, int]
    batch: int

    @property
    def name(self) -> str:
        return (
            f"{self.config_name}, {self.precision}, {self.memory_format}, "
            f"{self.size[0]}x{self.size[1]}, batch {self.batch}"
        )


def training_variants(
    configs: Dict[str, Sequence[str]],
    precisions: Sequence[str] = ("fp32",),
    memory_formats: Sequence[str] = ("contiguous",),
    sizes: Sequence[Tuple[int, int]] = ((320, 320),),
    batches: Sequence[int] = (8,),
) -> List[TrainingVariant]:
    """Every combination of the axes, the first of each axis first. ``configs``: name -> ``key=value`` overrides."""
    return [
        TrainingVariant(name, tuple(opts), precision, memory_format, size, batch)
        for (name, opts), precision, memory_format, size, batch in itertools.product(
            configs.items(), precisions, memory_formats, sizes, batches
        )
    ]


def _train_step(config_file: str, variant: TrainingVariant, device, num_gts: int) -> TrainStep:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(variant.opts))
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device)
    if variant.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    batch = make_batch(variant.batch, variant.size, num_gts, model.num_classes, model.device)
    return TrainStep(model, batch, variant.precision == "amp")


def training_speed_table(
    config_file: str,
    variants: Sequence[TrainingVariant],
    device="cpu",
    iters: int = 3,
    warmup: int = 1,
    num_gts: int = 8,
) -> str:
    """Markdown table: median s / iteration, images / s and the ratio of s / iteration to the first variant's, of a
    training iteration of each of ``variants`` of ``config_file`` on ``device``, ``iters`` alternating timed rounds
    after ``warmup``; ``num_gts`` random boxes per image."""
    device = torch.device(device)
    steps = {v.name: _train_step(config_file, v, device, num_gts) for v in variants}
    with EventStorage(0):
        seconds = median_times(steps, iters, warmup, device)
    where = device_description(device)
    base = seconds[variants[0].name]
    lines = [
        f"Training {config_file} on {where}, median of {iters} alternating rounds after {warmup} warm-up",
        "",
        "| variant | s / iteration | images / s | time vs first |",
        "|---|---:|---:|---:|",
    ]
    for v in variants:
        s = seconds[v.name]
        lines.append(f"| {v.name} | {s:.3f} | {v.batch / s:.1f} | {s / base:.2f} |")
    return "\n".join(lines)
