#!/usr/bin/env python
"""Export TOOD to ONNX or TorchScript, then check the exported model against the PyTorch model.

Detectron2's tools/deploy/export_model.py for LazyConfig files, with one export method (tracing; the design is in
projects/TOOD/tood/export.py). The output folder holds the model (model.onnx or model.ts) and tood_export.json
(input format, output names, post-processing thresholds), which ``tood.export.ExportedTOOD`` reads.

Verification: the exported model (ONNX Runtime on CPU, or the TorchScript module) runs on the sample images
(default: the first --num-images images of the generated shapes validation split), resized as the config's test
loader resizes, followed by ``tood.export.postprocess``; its detections must equal the PyTorch model's: same count
and classes, boxes within 0.01 px, scores within 1e-4 (per image, with the largest deviation of the dense
outputs). Then the median latency of both, end to end (post-processing included), on the first image with the
same number of CPU threads. Exit status 1 when the detections differ.

Examples::

    tools/export_model.py --config-file configs/tood_R_50_1x.py --format onnx --output output/export/onnx \\
        --weights tood_R_50_1x.pth
    tools/export_model.py --config-file configs/tood_R_50_1x.py --format torchscript --output output/export/ts \\
        --weights tood_R_50_1x.pth --sample-image photo.jpg --threads 4
    tools/export_model.py --config-file configs/tood_R_50_1x.py --format onnx --fixed-size --output out \\
        --weights tood_R_50_1x.pth dataloader.test.mapper.augmentations.0.short_edge_length=512
"""

import argparse
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import detectron2.data.transforms as T
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

import tood  # noqa: F401  registers TOOD's config resolvers and generated datasets
from tood.data import DEFAULT_SPLITS, get_shapes_dataset
from tood.export import (
    FORMATS,
    ExportedTOOD,
    TOODExportWrapper,
    detection_deviations,
    export_model,
    postprocess,
)

logger = logging.getLogger("tood.export_model")

BOX_TOLERANCE_PX = 0.01
SCORE_TOLERANCE = 1e-4


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the model")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="output format")
    parser.add_argument("--output", required=True, help="folder to write the exported model into")
    parser.add_argument("--weights", help="checkpoint to load (DetectionCheckpointer); random init without it")
    parser.add_argument(
        "--sample-image",
        action="append",
        metavar="IMG",
        help="image to trace and verify on; repeat for more (the first one is traced)",
    )
    parser.add_argument(
        "--num-images", type=int, default=2, help="generated images to verify on, without --sample-image"
    )
    parser.add_argument(
        "--fixed-size", action="store_true", help="ONNX: accept only the traced image's size (default: any size)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both runtimes")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per runtime (the median is reported)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def build_model(cfg, weights) -> torch.nn.Module:
    # The ATSS warm-up length follows the training schedule; inference does not use it.
    cfg.model.tal_start_iter = 0
    model = instantiate(cfg.model).eval()
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning(
            "No --weights: exporting a randomly initialised model. Its scores sit near the classifier prior, "
            "so expect no detections; the dense outputs are still compared."
        )
    return model


def load_images(cfg, args, input_format: str) -> List[Tuple[str, torch.Tensor]]:
    """(path, (3, H, W) float32 image) of each sample image, resized by the config's test-time augmentations."""
    paths = args.sample_image
    if not paths:
        folder = get_shapes_dataset(args.num_images, seed=DEFAULT_SPLITS["tood_shapes_val"][1])
        paths = sorted(str(p) for p in (folder / "images").iterdir())[: args.num_images]
    augmentations = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
    images = []
    for path in paths:
        aug_input = T.AugInput(read_image(path, format=input_format))
        augmentations(aug_input)
        images.append((path, torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))))
    return images


def median_latencies_ms(fns: Dict[str, Callable[[], object]], runs: int, warmup: int = 2) -> Dict[str, float]:
    """Median wall time of each ``fn()`` over ``runs`` calls, after ``warmup`` calls (TorchScript optimises its
    graph in the first runs, ONNX Runtime allocates its buffers). The functions take turns, so that a load change
    on a shared machine hits them alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def verify(model, exported: ExportedTOOD, images) -> bool:
    """Compares the exported model's detections with the PyTorch model's on each image; logs the deviations."""
    wrapper = TOODExportWrapper(model)
    ok = True
    for path, image in images:
        size = exported.metadata["input_size"]
        if size is not None and list(image.shape[-2:]) != size:
            logger.info(f"{path}: skipped, {tuple(image.shape[-2:])} is not the fixed input size {tuple(size)}")
            continue
        with torch.no_grad():
            reference = model([{"image": image}])[0]["instances"]
            dense_reference = wrapper(image)
        dense = exported.run(image)
        num_levels = len(dense) // 2
        dense_dev = [float((a - b).abs().max()) for a, b in zip(dense, dense_reference)]
        dev = detection_deviations(reference, postprocess(dense, tuple(image.shape[-2:]), exported.params))
        same_classes = dev["box"] != float("inf")
        passed = dev["box"] <= BOX_TOLERANCE_PX and dev["score"] <= SCORE_TOLERANCE
        ok &= passed
        logger.info(
            f"{os.path.basename(path)} {image.shape[1]}x{image.shape[2]}: {dev['count']} detections (PyTorch), "
            f"{'same count and classes' if same_classes else 'DIFFERENT count or classes'}, "
            f"max |d box| {dev['box']:.2e} px, max |d score| {dev['score']:.2e}; dense outputs: max |d score| "
            f"{max(dense_dev[:num_levels]):.2e}, max |d box| {max(dense_dev[num_levels:]):.2e} px "
            f"-> {'OK' if passed else 'FAILED'}"
        )
    return ok


def main(args) -> dict:
    """Returns ``{"path": model file, "ok": verification passed, "latency_ms": {"pytorch": ..., format: ...}}``."""
    setup_logger(name="tood")
    setup_logger()
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    torch.set_num_threads(args.threads)
    model = build_model(cfg, args.weights)
    images = load_images(cfg, args, model.input_format)

    start = time.perf_counter()
    path = export_model(model, images[0][1], args.output, args.format, dynamic=not args.fixed_size)
    logger.info(f"Exported {args.format} to {path} in {time.perf_counter() - start:.1f}s")

    exported = ExportedTOOD(args.output, num_threads=args.threads)
    ok = verify(model, exported, images)

    image = images[0][1]
    with torch.no_grad():
        latency = median_latencies_ms(
            {"pytorch": lambda: model([{"image": image}]), args.format: lambda: exported(image)}, args.runs
        )
    runtime = "ONNX Runtime" if args.format == "onnx" else "TorchScript"
    logger.info(
        f"Latency, median of {args.runs} runs, {args.threads} CPU threads, {image.shape[1]}x{image.shape[2]} input, "
        f"end to end: PyTorch {latency['pytorch']:.1f} ms, {runtime} {latency[args.format]:.1f} ms "
        f"(speed-up {latency['pytorch'] / latency[args.format]:.2f}x)"
    )
    if not ok:
        logger.error(
            f"Verification FAILED: boxes must agree within {BOX_TOLERANCE_PX} px, scores within {SCORE_TOLERANCE}"
        )
    return {"path": path, "ok": ok, "latency_ms": latency}


if __name__ == "__main__":
    sys.exit(0 if main(argument_parser().parse_args())["ok"] else 1)
