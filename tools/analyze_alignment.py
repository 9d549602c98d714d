#!/usr/bin/env python
"""Measure and draw how well dense detectors' classification scores rank their own boxes (TOOD's claim).

For each model (TOOD, RetinaNet, FCOS, or any dense detector with an adapter in :mod:`tood.alignment`) on a
dataset's test loader: the metrics of :mod:`tood.alignment` (score-IoU correlation, top-1 agreement, IoU of the
top-scored prediction, NMS misrank rate), printed as a table and written to ``alignment.json``; a score-vs-IoU
scatter plot (``scatter.png``, one panel per model); and for the first ``--num-figures`` images with objects,
the score map and the IoU map of the largest object at the level of its best prediction, drawn over the image
(``maps/MODEL_IMAGEID.png``; red: cell of the highest score, green: of the highest IoU).

The ground truth comes from the config's test loader with its mapper switched to ``is_train=True`` (Detectron2's
DatasetMapper drops annotations otherwise); the test augmentations are unchanged. Scores and boxes are the
model's own pre-NMS predictions; NMS uses the model's ``test_nms_thresh`` and ``test_score_thresh``.

Examples::

    tools/analyze_alignment.py --config-file configs/quickstart_shapes.py \\
        --weights output/quickstart/model_final.pth --output output/alignment --max-images 100
    tools/analyze_alignment.py --compare TOOD=configs/tood_R_50_1x.py:tood.pth \\
        --compare RetinaNet=retinanet_R_50_FPN_1x.py:retinanet.pth --compare FCOS=fcos_R_50_FPN_1x.py:fcos.pth \\
        --dataset coco_2017_val --max-images 500 --output output/alignment train.device=cuda
"""

import argparse
from pathlib import Path

from detectron2.utils.logger import setup_logger

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from studies.alignment_report import alignment_report


def parse_compare(spec):
    """``NAME=CONFIG:WEIGHTS`` -> (name, config, weights); the weights may be a URL (split at the first ':')."""
    name, sep, rest = spec.partition("=")
    config, sep2, weights = rest.partition(":")
    if not (sep and sep2 and name and config and weights):
        raise argparse.ArgumentTypeError(f"expected NAME=CONFIG:WEIGHTS, got {spec!r}")
    return name, config, weights


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", help="LazyConfig of the model (with --weights)")
    parser.add_argument("--weights", help="checkpoint loaded with DetectionCheckpointer")
    parser.add_argument(
        "--compare",
        type=parse_compare,
        action="append",
        default=[],
        metavar="NAME=CONFIG:WEIGHTS",
        help="a model to put in the comparison (repeat for each model; instead of --config-file/--weights)",
    )
    parser.add_argument("--dataset", help="registered dataset (default: the config's dataloader.test.dataset.names)")
    parser.add_argument("--output", default="output/alignment", help="folder for alignment.json and the figures")
    parser.add_argument("--max-images", type=int, help="stop after this many images")
    parser.add_argument("--num-figures", type=int, default=4, help="images to draw object maps for, per model")
    parser.add_argument("--min-iou", type=float, default=0.1, help="a candidate's least IoU with its object")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides (for every model)")
    return parser


def parse_args(argv=None):
    """The command line ``argv`` (default: sys.argv), checked; exits with status 2 and the reason on an error."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.compare and (args.config_file or args.weights):
        parser.error("use either --compare or --config-file/--weights")
    if not args.compare and not (args.config_file and args.weights):
        parser.error("--config-file and --weights are required (or --compare NAME=CONFIG:WEIGHTS ...)")
    args.models = args.compare or [(Path(args.config_file).stem, args.config_file, args.weights)]
    if len({name for name, _, _ in args.models}) != len(args.models):
        parser.error("model names must be unique")
    return args


def main(args):
    return alignment_report(
        {name: (config, weights) for name, config, weights in args.models},
        args.output,
        opts=args.opts,
        dataset=args.dataset,
        max_images=args.max_images,
        num_figures=args.num_figures,
        min_iou=args.min_iou,
    )


if __name__ == "__main__":
    args = parse_args()
    setup_logger(name="tood")
    setup_logger(name="studies")
    main(args)
