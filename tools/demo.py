#!/usr/bin/env python
"""Run a trained model on images, folders, globs or a video, and write the detections drawn on them.

Detectron2's demo/demo.py for LazyConfig files: the config gives the model, the test-time resize and the
dataset whose class names label the boxes; ``train.init_checkpoint`` (in ``--opts``) gives the weights.

Examples::

    tools/demo.py --config-file configs/quickstart_shapes.py --input photo.jpg 'shots/*.png' folder/ \\
        --output output/demo --opts train.init_checkpoint=output/quickstart/model_final.pth
    tools/demo.py --config-file configs/tood_R_50_1x.py --video-input clip.mp4 --output output/demo \\
        --opts train.init_checkpoint=tood_r50_1x.pth train.device=cpu
"""

import argparse
import os

from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from tood.engine import LazyPredictor
from tood.engine.arguments import add_precision_argument, add_register_coco_argument, register_coco_datasets
from tood.engine.visualization import expand_inputs, run_on_images, run_on_video


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file of the model")
    parser.add_argument("--input", nargs="+", default=[], help="images, folders of images or quoted globs")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument(
        "--output",
        default="output/demo",
        help="folder for the drawn images or video (default: %(default)s); a file name for one video",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    add_precision_argument(parser, default_help="the config's training precision on CPU, float32 on CUDA")
    add_register_coco_argument(
        parser, help="register a COCO-format dataset (for its class names, via dataloader.test.dataset.names=NAME)"
    )
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, key=value")
    return parser


def main(args):
    if not args.input and not args.video_input:
        raise SystemExit("Nothing to do: give --input and/or --video-input")
    setup_logger(name="fvcore")
    logger = setup_logger()
    register_coco_datasets(args.register_coco)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    predictor = LazyPredictor(cfg, args.precision)
    logger.info(f"Precision: {predictor.precision}")

    written = []
    if args.input:
        paths = expand_inputs(args.input)
        if not paths:
            raise FileNotFoundError(f"No image found in {args.input}")
        written += run_on_images(predictor, paths, args.output, args.confidence_threshold)
    if args.video_input:
        output = args.output
        if not output.lower().endswith(".mp4"):
            os.makedirs(output, exist_ok=True)
            output = os.path.join(output, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
        written.append(run_on_video(predictor, args.video_input, output, args.confidence_threshold))
    logger.info(f"Wrote {len(written)} file(s) to {os.path.dirname(written[0]) or '.'}")
    return written


if __name__ == "__main__":
    main(argument_parser().parse_args())
