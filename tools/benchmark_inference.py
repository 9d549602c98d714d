#!/usr/bin/env python
"""Inference of one image by the PyTorch model in float32 and in bfloat16 autocast, and by exported models, side by
side in one process: latency, and what each changes in the detections of float32 PyTorch.

The image is resized as the config's test loader resizes it. Each runner predicts it in turn, ``--warmup`` rounds
and then ``--runs`` timed rounds, end to end (post-processing included); the median is reported. Detections are
compared with float32 PyTorch's by pairing each with the same-class detection that overlaps it most (IoU >= 0.5):
detections lost and new (with the highest score among them), and over the pairs the largest and the median box
coordinate difference (pixels) and score difference. Prints a markdown table.

Examples::

    tools/benchmark_inference.py --config-file configs/tood_R_50_1x.py --weights tood_R_50_1x.pth \\
        --image photo.jpg --threads 2
    tools/benchmark_inference.py --config-file configs/tood_R_50_1x.py --weights tood_R_50_1x.pth \\
        --image photo.jpg --exported output/export/onnx output/export/pt2 output/export/pt2_bf16 --runs 5
"""

import argparse

import torch
from detectron2.config import LazyConfig

import tood  # noqa: F401  registers TOOD's config resolvers
from benchmarks.inference import inference_runners, inference_table, markdown_table
from tood.export import build_model, verification_images


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig of the model")
    parser.add_argument("--weights", required=True, help="checkpoint to load (DetectionCheckpointer)")
    parser.add_argument("--image", required=True, help="the image to predict")
    parser.add_argument("--exported", nargs="*", default=[], metavar="DIR", help="folders of tools/export_model.py")
    parser.add_argument("--threads", type=int, help="CPU threads of every runtime (default: torch's)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def main(args):
    """Returns the rows of :func:`benchmarks.inference.inference_table`; prints them as a table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = build_model(cfg, args.weights)
    image = verification_images(cfg, model.input_format, [args.image])[0][1]
    rows = inference_table(inference_runners(model, image, args.exported), args.runs, args.warmup)
    print(
        f"{image.shape[1]}x{image.shape[2]} input, {torch.get_num_threads()} threads, median of {args.runs} runs; "
        "detections compared with PyTorch float32's\n"
    )
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main(argument_parser().parse_args())
