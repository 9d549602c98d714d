#!/usr/bin/env python
"""Accuracy study: TOOD against Detectron2's RetinaNet and FCOS, and TOOD's controls, trained from scratch on the
generated shapes under one protocol (studies.accuracy.run_protocol).

The detectors share the backbone, input normalisation, data, batch, iterations and schedule (configs/
quickstart_shapes.py, quickstart_shapes_retinanet.py, quickstart_shapes_fcos.py); each keeps its head, assignment,
losses and post-processing. Every detector gets the same optimiser sweep (AdamW lr 3e-4 / 1e-3 / 2e-3 / 4e-3,
SGD lr 0.01), selected on tood_shapes_tune; its setting is then trained with every seed and evaluated on
tood_shapes_val, with its own and with a matched post-processing, and its alignment measured. The controls take
TOOD's selected setting: "TOOD (ATSS only)" never switches to task-aligned assignment (the paper's ablation),
"TOOD (prior 0.01)" starts the alignment map at sigmoid(M) = 0.01 as the reference does instead of the quick
start's 0.5.

Everything goes into --output (one folder per run; results.md, results.json, ap.png); run the same command again to
resume an interrupted study. Extra key=value arguments override every config.

Examples::

    tools/accuracy_study.py --max-iter 300
    tools/accuracy_study.py --max-iter 300 --seeds 0,1,2,3,4 --models TOOD,FCOS
"""

import argparse
import os

from detectron2.utils.logger import setup_logger

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from studies.accuracy import Detector, run_protocol

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TOOD = os.path.join(CONFIGS, "quickstart_shapes.py")
# Name -> detector; also the order of the tables.
MODELS = {
    "TOOD": Detector(TOOD),
    "RetinaNet": Detector(os.path.join(CONFIGS, "quickstart_shapes_retinanet.py")),
    "FCOS": Detector(os.path.join(CONFIGS, "quickstart_shapes_fcos.py")),
    "TOOD (ATSS only)": Detector(TOOD, ("model.tal_start_iter=1000000000",), tuned_like="TOOD"),
    "TOOD (prior 0.01)": Detector(TOOD, ("model.head.alignment_prior_prob=0.01",), tuned_like="TOOD"),
}


def comma_list(kind):
    def parse(text):
        return [kind(x) for x in text.split(",")]

    return parse


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        type=comma_list(str),
        default=list(MODELS),
        help=f"comma-separated (default: all): {', '.join(MODELS)}",
    )
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    parser.add_argument("--max-iter", type=int, help="training iterations of every run (default: the quick start's)")
    parser.add_argument("--alignment-images", type=int, default=100, help="test images for the alignment metrics")
    parser.add_argument("--output", default="output/accuracy_study", help="runs, results.md, results.json, ap.png")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for all models, key=value")
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    unknown = [n for n in args.models if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose among {', '.join(MODELS)}")
    orphans = [n for n in args.models if MODELS[n].tuned_like and MODELS[n].tuned_like not in args.models]
    if orphans:
        parser.error(f"{', '.join(orphans)} take(s) TOOD's selected setting: add TOOD to --models")
    setup_logger(name="studies")
    run_protocol(
        {name: MODELS[name] for name in MODELS if name in args.models},
        args.output,
        seeds=args.seeds,
        max_iter=args.max_iter,
        alignment_images=args.alignment_images,
        opts=args.opts,
    )
