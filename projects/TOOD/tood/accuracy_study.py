"""Accuracy study: detectors trained one after the other from LazyConfigs alike but for the detector, for the same
number of iterations, then compared (``tools/accuracy_study.py``: TOOD, RetinaNet and FCOS on the generated shapes).

:func:`run_study` trains each model through :func:`tood.engine.training.setup` and
:func:`~tood.engine.training.do_train` into its own folder, evaluating every ``eval_period`` iterations and at the
end, and writes, into the study's folder:

* ``results.md`` (:func:`format_results`): the box AP of each model's last evaluation (AP, AP50, AP75, APs, APm,
  APl), its wall time and seconds per training iteration (log.txt's "Total training time": the training loop with
  its checkpoints and periodic evaluations, not the final one; and "Overall training speed": the steps alone,
  after 3 warm-up iterations), then the AP and AP50 at every evaluation;
* ``ap.png`` (:func:`plot_results`): AP and AP50 over the training iterations, one line per model.

A folder that already holds model_final.pth and metrics.json is not trained again, and an unfinished run
continues from its last checkpoint: run the same study again to resume it.
"""

import contextlib
import json
import logging
import os
import re
from datetime import timedelta
from typing import Dict, Optional, Sequence

from detectron2.config import LazyConfig
from detectron2.utils.logger import setup_logger
from matplotlib.figure import Figure
from tabulate import tabulate

from .engine.training import argument_parser, do_train, setup

__all__ = ["format_results", "is_finished", "plot_results", "read_run", "run_study", "train"]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_DURATION = r"(?:(\d+) days?, )?(\d+):(\d+):(\d+)"  # str(datetime.timedelta)


def is_finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a finished run (model_final.pth and metrics.json)."""
    return all(os.path.isfile(os.path.join(run_dir, f)) for f in ("model_final.pth", "metrics.json"))


@contextlib.contextmanager
def _own_log_files():
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


def train(config_file: str, run_dir: str, max_iter: int, eval_period: int, opts: Sequence[str] = ()) -> None:
    """Trains the model of ``config_file`` into ``run_dir`` as ``tools/train_net.py --resume`` does, continuing
    from its last checkpoint if any; ``opts``: more key=value overrides."""
    overrides = [f"train.output_dir={run_dir}", f"train.max_iter={max_iter}", f"train.eval_period={eval_period}"]
    args = argument_parser().parse_args(["--config-file", config_file, "--resume", *overrides, *opts])
    with _own_log_files():
        do_train(args, setup(args))


def _seconds(match) -> float:
    days, hours, minutes, seconds = (int(x or 0) for x in match)
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()


def read_run(run_dir: str) -> Dict:
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


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_results(results: Dict[str, Dict]) -> str:
    """Markdown of name -> :func:`read_run`: the last evaluation of each run, then AP / AP50 at every evaluation."""
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


def plot_results(results: Dict[str, Dict], path: str) -> None:
    """AP and AP50 of name -> :func:`read_run` over the iterations, one line per model, into ``path``."""
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


def run_study(
    configs: Dict[str, str],
    output_dir: str,
    max_iter: Optional[int] = None,
    eval_period: Optional[int] = None,
    opts: Sequence[str] = (),
    finished_runs: Optional[Dict[str, str]] = None,
) -> Dict[str, Dict]:
    """Trains (or reuses) each model and writes results.md and ap.png into ``output_dir``; prints the results.

    Args:
        configs: model name -> LazyConfig file, in the order of the table and plot. Each model trains in
            ``output_dir``/lower-case name.
        max_iter: training iterations of every model; default the first config's ``train.max_iter``.
        eval_period: evaluate every this many iterations and at the end; default ``max_iter // 4``.
        opts: key=value overrides of every config.
        finished_runs: name -> folder of a finished run to read that model's results from instead.

    Returns:
        name -> :func:`read_run` of its run.
    """
    if max_iter is None:
        max_iter = LazyConfig.load(next(iter(configs.values()))).train.max_iter
    if eval_period is None:
        eval_period = max_iter // 4
    finished_runs = finished_runs or {}
    results = {}
    for name, config_file in configs.items():
        run_dir = finished_runs.get(name) or os.path.join(output_dir, name.lower())
        if is_finished(run_dir):
            print(f"{name}: reusing the finished run in {run_dir}")
        else:
            print(f"{name}: training {max_iter} iterations into {run_dir}")
            train(config_file, run_dir, max_iter, eval_period, opts)
        results[name] = read_run(run_dir)
        if results[name]["iterations"] != max_iter:
            print(
                f"WARNING: {name}'s run in {run_dir} trained {results[name]['iterations']} iterations, not {max_iter}: "
                "the comparison is unfair (remove the folder to train it again)"
            )

    os.makedirs(output_dir, exist_ok=True)
    table = format_results(results)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table)
    plot_path = os.path.join(output_dir, "ap.png")
    plot_results(results, plot_path)
    print(f"\n{table}\nPlot: {plot_path}")
    return results
