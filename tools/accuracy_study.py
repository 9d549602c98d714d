#!/usr/bin/env python
"""Accuracy study: TOOD against Detectron2's RetinaNet and FCOS, trained from scratch on the generated shapes.

The three quick-start configs (configs/quickstart_shapes.py, quickstart_shapes_retinanet.py,
quickstart_shapes_fcos.py) share the backbone, input normalisation, data, batch, optimizer, learning rate and
schedule; they differ in what makes each detector: head, assignment, losses and post-processing (see each config).
Each model is trained one after the other through tools/train_net.py, for the same ``--max-iter`` iterations,
evaluated with COCOEvaluator every ``--eval-period`` iterations and at the end. Written into ``--output``, and
printed:

* ``results.md``: the box AP of each model's last evaluation (AP, AP50, AP75, APs, APm, APl), its wall time and
  seconds per training iteration (log.txt's "Total training time": the training loop with its checkpoints and
  periodic evaluations, not the final one; and "Overall training speed": the steps alone, after 3 warm-up
  iterations), then the AP and AP50 at every evaluation;
* ``ap.png``: AP and AP50 over the training iterations, one line per model.

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
import contextlib
import json
import logging
import os
import re
from datetime import timedelta

import train_net
from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger
from matplotlib.figure import Figure
from tabulate import tabulate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Name -> config file; also the order of the table and plot.
MODELS = {
    "TOOD": os.path.join(REPO_ROOT, "configs", "quickstart_shapes.py"),
    "RetinaNet": os.path.join(REPO_ROOT, "configs", "quickstart_shapes_retinanet.py"),
    "FCOS": os.path.join(REPO_ROOT, "configs", "quickstart_shapes_fcos.py"),
}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_DURATION = r"(?:(\d+) days?, )?(\d+):(\d+):(\d+)"  # str(datetime.timedelta)


def is_finished(run_dir):
    return all(os.path.isfile(os.path.join(run_dir, f)) for f in ("model_final.pth", "metrics.json"))


@contextlib.contextmanager
def own_log_files():
    """Detectron2's setup_logger adds a console and a log.txt handler to process-wide loggers for each output
    folder; removes the ones a run added when it ends, so that the next run's lines go neither into this run's
    log.txt nor twice to the console."""
    loggers = [logging.getLogger(name) for name in ("detectron2", "fvcore", "tood")]
    before = {logger: list(logger.handlers) for logger in loggers}
    try:
        yield
    finally:
        for logger in loggers:
            for handler in [h for h in logger.handlers if h not in before[logger]]:
                logger.removeHandler(handler)
        setup_logger.cache_clear()  # it caches by folder: one trained again in this process gets its handlers back


def train(config_file, run_dir, max_iter, eval_period, opts):
    """Trains one model into ``run_dir`` with tools/train_net.py, continuing from its last checkpoint if any."""
    overrides = [f"train.output_dir={run_dir}", f"train.max_iter={max_iter}", f"train.eval_period={eval_period}"]
    args = train_net.argument_parser().parse_args(["--config-file", config_file, "--resume", *overrides, *opts])
    with own_log_files():
        cfg = train_net.setup(args)
        train_net.do_train(args, cfg)


def read_run(run_dir):
    """Results of a finished run from its metrics.json and log.txt.

    Returns:
        dict: ``iterations`` (trained), ``evaluations`` ({iterations trained: {metric: box AP}}), ``wall_s`` and
        ``s_per_iter`` (None where log.txt does not say).
    """
    with open(os.path.join(run_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    iterations = 1 + max((r["iteration"] for r in records if "total_loss" in r), default=-1)
    evaluations = {}
    for record in records:
        if "bbox/AP" in record:
            # Detectron2 logs a periodic evaluation at the iteration just trained, the final one at max_iter. A
            # resumed run logs again the evaluations after its last checkpoint: the later line wins.
            evaluations[min(record["iteration"] + 1, iterations)] = {m: record[f"bbox/{m}"] for m in METRICS}
    log_path = os.path.join(run_dir, "log.txt")
    log = ""
    if os.path.isfile(log_path):
        with open(log_path) as f:
            log = f.read()
    # One line of each per training session: a resumed run has several.
    wall = [_seconds(m) for m in re.findall(rf"Total training time: {_DURATION}", log)]
    speed = [
        (int(n), float(s)) for n, s in re.findall(r"Overall training speed: (\d+) iterations in .*? \(([\d.]+) s", log)
    ]
    return {
        "iterations": iterations,
        "evaluations": dict(sorted(evaluations.items())),
        "wall_s": sum(wall) if wall else None,
        "s_per_iter": sum(n * s for n, s in speed) / sum(n for n, _ in speed) if speed else None,
    }


def _seconds(match):
    days, hours, minutes, seconds = (int(x or 0) for x in match)
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def format_results(results):
    """Markdown: the last evaluation of each run, then AP / AP50 at every evaluation."""
    rows = []
    for name, run in results.items():
        final = run["evaluations"][max(run["evaluations"])] if run["evaluations"] else {}
        wall = "-" if run["wall_s"] is None else str(timedelta(seconds=round(run["wall_s"])))
        rows.append(
            [name, run["iterations"], *(_fmt(final.get(m)) for m in METRICS), wall, _fmt(run["s_per_iter"], ".3f")]
        )
    headers = ["model", "iterations", *METRICS, "wall time", "s / iteration"]
    final_table = tabulate(rows, headers, tablefmt="pipe", disable_numparse=True)

    iterations = sorted({i for run in results.values() for i in run["evaluations"]})
    rows = [
        [name if metric == "AP" else "", metric, *(_fmt(run["evaluations"].get(i, {}).get(metric)) for i in iterations)]
        for name, run in results.items()
        for metric in ("AP", "AP50")
    ]
    headers = ["model", "metric", *(str(i) for i in iterations)]
    curve_table = tabulate(rows, headers, tablefmt="pipe", disable_numparse=True)
    return (
        "Box AP (COCO, %) of each model's last evaluation; wall time of the training loop, periodic evaluations "
        "included:\n\n"
        f"{final_table}\n\nBox AP at each evaluation (columns: iterations trained):\n\n{curve_table}\n"
    )


def plot_results(results, path):
    """AP and AP50 over the iterations, one line per model."""
    fig = Figure(figsize=(11, 4.5), tight_layout=True)
    for index, metric in enumerate(("AP", "AP50")):
        ax = fig.add_subplot(1, 2, index + 1)
        for name, run in results.items():
            points = run["evaluations"]
            ax.plot(list(points), [p[metric] for p in points.values()], marker="o", label=name)
        ax.set_xlabel("training iterations")
        ax.set_ylabel(f"box {metric} (%)")
        ax.set_title(f"box {metric} on the validation set")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)


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


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.tood_run and "TOOD" not in args.models:
        parser.error("--tood-run needs TOOD among --models")
    if args.tood_run and not is_finished(args.tood_run):
        parser.error(f"--tood-run {args.tood_run} holds no model_final.pth and metrics.json")
    max_iter = LazyConfig.load(MODELS["TOOD"]).train.max_iter if args.max_iter is None else args.max_iter
    eval_period = max_iter // 4 if args.eval_period is None else args.eval_period

    results = {}
    for name in [n for n in MODELS if n in args.models]:
        run_dir = args.tood_run if name == "TOOD" and args.tood_run else os.path.join(args.output, name.lower())
        if is_finished(run_dir):
            print(f"{name}: reusing the finished run in {run_dir}")
        else:
            print(f"{name}: training {max_iter} iterations into {run_dir}")
            train(MODELS[name], run_dir, max_iter, eval_period, args.opts)
        results[name] = read_run(run_dir)
        if results[name]["iterations"] != max_iter:
            print(
                f"WARNING: {name}'s run in {run_dir} trained {results[name]['iterations']} iterations, not {max_iter}: "
                "the comparison is unfair (remove the folder to train it again)"
            )

    os.makedirs(args.output, exist_ok=True)
    table = format_results(results)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table)
    plot_path = os.path.join(args.output, "ap.png")
    plot_results(results, plot_path)
    print(f"\n{table}\nPlot: {plot_path}")
    return results


if __name__ == "__main__":
    main()
