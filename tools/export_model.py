#!/usr/bin/env python
"""Export TOOD with torch.export (ONNX, ExportedProgram, AOTInductor), then check the exported model against the
PyTorch model.

Detectron2's tools/deploy/export_model.py for LazyConfig files, with one export method (``torch.export``; the design
is in projects/TOOD/tood/export.py). The output folder holds the model (model.onnx, model.pt2 or model_aoti.pt2)
and tood_export.json (input size and padding, output names, post-processing thresholds), which
``tood.export.ExportedTOOD`` reads. The aoti format compiles C++ and needs a C++ compiler.

Verification: the exported model (ONNX Runtime on CPU, the ExportedProgram in PyTorch, or the AOTInductor package)
runs on the sample images (default: the first --num-images images of the generated shapes validation split),
resized as the config's test loader resizes, followed by ``tood.export.postprocess``; its detections must equal
the PyTorch model's: same count and classes, boxes within 0.01 px, scores within 1e-4 (per image, with the largest
deviation of the dense outputs). Then the median latency of both, end to end (post-processing included), on the
first image with the same number of CPU threads. Exit status 1 when the detections differ.

Precision (``--precision``, said first): float32, or for pt2 bfloat16 autocast inside the graph, fixed at export;
the PyTorch model runs in the same precision to compare and to time. By default the config's training precision
(the COCO configs: float32); onnx and aoti are float32 only.

Examples::

    tools/export_model.py --config-file configs/tood_R_50_1x.py --output output/export/onnx \\
        --weights tood_R_50_1x.pth
    tools/export_model.py --config-file configs/tood_R_50_1x.py --format pt2 --output output/export/pt2 \\
        --weights tood_R_50_1x.pth --sample-image photo.jpg --threads 4
    tools/export_model.py --config-file configs/tood_R_50_1x.py --format pt2 --precision bf16 \\
        --output output/export/pt2_bf16 --weights tood_R_50_1x.pth
    tools/export_model.py --config-file configs/tood_R_50_1x.py --format onnx --fixed-size --output out \\
        --weights tood_R_50_1x.pth dataloader.test.mapper.augmentations.0.short_edge_length=512
"""

import argparse
import logging
import sys

import torch
from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger

import tood  # noqa: F401  registers TOOD's config resolvers and generated datasets
from benchmarks.timing import median_times
from tood.data import DEFAULT_SPLITS, get_shapes_dataset
from tood.engine.arguments import add_precision_argument
from tood.export import FORMATS, export_and_verify
from tood.precision import inference_autocast

logger = logging.getLogger("tood.export")
RUNTIMES = {"onnx": "ONNX Runtime", "pt2": "ExportedProgram", "aoti": "AOTInductor"}


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the model")
    parser.add_argument("--format", default="onnx", choices=sorted(FORMATS), help="output format (default: onnx)")
    parser.add_argument("--output", required=True, help="folder to write the exported model into")
    parser.add_argument("--weights", help="checkpoint to load (DetectionCheckpointer); random init without it")
    add_precision_argument(parser, default_help="the config's training precision; onnx and aoti: fp32 only")
    parser.add_argument(
        "--sample-image",
        action="append",
        default=[],
        metavar="IMG",
        help="image to export on and verify on; repeat for more (the first one is the export's example)",
    )
    parser.add_argument(
        "--num-images", type=int, default=2, help="generated images to verify on, without --sample-image"
    )
    parser.add_argument(
        "--fixed-size", action="store_true", help="accept only the first image's padded size (default: any size)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both runtimes")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per runtime (the median is reported)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def sample_images(args) -> list:
    """The paths of --sample-image, or of the first --num-images generated validation images."""
    if args.sample_image:
        return args.sample_image
    folder = get_shapes_dataset(args.num_images, seed=DEFAULT_SPLITS["tood_shapes_val"][1])
    return sorted(str(p) for p in (folder / "images").iterdir())[: args.num_images]


def main(args) -> dict:
    """Exports, verifies and times; returns ``{"path", "ok", "bf16", "export_s", "latency_ms"}``, the latency as
    ``{"pytorch": ms, format: ms}``, both in the export's precision."""
    result = export_and_verify(
        LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts),
        args.format,
        args.output,
        sample_images(args),
        weights=args.weights,
        dynamic=not args.fixed_size,
        num_threads=args.threads,
        precision=args.precision,
    )
    # End to end, post-processing included, on the first image; 2 warm-up calls (ONNX Runtime allocates its
    # buffers, PyTorch its caches).
    image = result.images[0][1]
    bf16 = result.exported.bf16

    def pytorch():
        with inference_autocast(bf16):
            return result.model([{"image": image}])

    with torch.no_grad():
        seconds = median_times({"pytorch": pytorch, args.format: lambda: result.exported(image)}, args.runs, warmup=2)
    latency = {name: 1000 * s for name, s in seconds.items()}
    runtime = RUNTIMES[args.format]
    logger.info(
        f"Latency, median of {args.runs} runs, {torch.get_num_threads()} CPU threads, "
        f"{'bfloat16 autocast' if bf16 else 'float32'}, "
        f"{image.shape[1]}x{image.shape[2]} input, end to end: PyTorch {latency['pytorch']:.1f} ms, "
        f"{runtime} {latency[args.format]:.1f} ms (speed-up {latency['pytorch'] / latency[args.format]:.2f}x); "
        f"export took {result.export_seconds:.1f} s"
    )
    return {
        "path": result.path,
        "ok": result.ok,
        "bf16": bf16,
        "export_s": result.export_seconds,
        "latency_ms": latency,
    }


if __name__ == "__main__":
    args = argument_parser().parse_args()
    setup_logger(name="tood")
    setup_logger()
    sys.exit(0 if main(args)["ok"] else 1)
