#!/usr/bin/env python
"""Accuracy study: TOOD against Detectron2's RetinaNet and FCOS, trained from scratch on the generated shapes.

The three quick-start configs (configs/quickstart_shapes.py, quickstart_shapes_retinanet.py,
quickstart_shapes_fcos.py) share the backbone, input normalisation, data, batch, optimizer, learning rate and
schedule; they differ in what makes each detector: head, assignment, losses and post-processing (see each config).
Each model is trained one after the other as tools/train_net.py trains (``tood.accuracy_study``), for the same
``--max-iter`` iterations, evaluated with COCOEvaluator every ``--eval-period`` iterations and at the end. Written
into ``--output``, and printed: ``results.md``, the box AP of each model's last evaluation, its wall time and
seconds per training iteration, then the AP and AP50 at every evaluation; ``ap.png``, AP and AP50 over the
training iterations, one line per model.

Each model trains in ``--output``/NAME (e.g. output/accuracy_study/retinanet). A folder that already holds
model_final.pth and metrics.json is not trained again, and an unfinished run continues from its last
checkpoint: run the same command again to resume an interrupted study. ``--tood-run`` reads TOOD's results from
an existing run instead, e.g. tools/quickstart.py's (which evaluates once, at the end: one point on the plot).
Extra ``key=value`` arguments override all three configs, as for tools/train_net.py.

Examples::

    tools/accuracy_study.py
    tools/accuracy_study.py --max-iter 300 --eval-period 50 --models TOOD,FCOS train.seed=0
    tools/accuracy_study.py --tood-run output/quickstart
"""

import argparse
import os

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from tood.accuracy_study import is_finished, run_study

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# Name -> config file; also the order of the table and plot.
MODELS = {
    "TOOD": os.path.join(CONFIGS, "quickstart_shapes.py"),
    "RetinaNet": os.path.join(CONFIGS, "quickstart_shapes_retinanet.py"),
    "FCOS": os.path.join(CONFIGS, "quickstart_shapes_fcos.py"),
}


def model_names(text):
    """``--models``: comma-separated (a space-separated list would swallow the key=value overrides after it)."""
    names = text.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown)}; choose among {', '.join(MODELS)}")
    return names


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        type=model_names,
        default=list(MODELS),
        help=f"comma-separated models to compare (default: {','.join(MODELS)})",
    )
    parser.add_argument("--max-iter", type=int, help="training iterations of every model (default: the quick start's)")
    parser.add_argument(
        "--eval-period", type=int, help="evaluate every N iterations and at the end (default: max_iter // 4)"
    )
    parser.add_argument("--output", default="output/accuracy_study", help="one folder per model, results.md, ap.png")
    parser.add_argument(
        "--tood-run", metavar="DIR", help="TOOD's results from this finished run instead of training it"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for all models, key=value")
    return parser


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    if args.tood_run and "TOOD" not in args.models:
        parser.error("--tood-run needs TOOD among --models")
    if args.tood_run and not is_finished(args.tood_run):
        parser.error(f"--tood-run {args.tood_run} holds no model_final.pth and metrics.json")
    run_study(
        {name: config for name, config in MODELS.items() if name in args.models},
        args.output,
        max_iter=args.max_iter,
        eval_period=args.eval_period,
        opts=args.opts,
        finished_runs={"TOOD": args.tood_run} if args.tood_run else None,
    )
