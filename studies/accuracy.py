"""Accuracy study: detectors compared under one protocol (``tools/accuracy_study.py``: TOOD, Detectron2's RetinaNet
and FCOS, and TOOD's controls, on the generated shapes).

:func:`run_protocol` gives every detector the same treatment:

1. **Sweep**: each detector is trained with each optimiser :class:`Setting` (seed ``seeds[0]``) and evaluated on a
   held-out *tuning* split (``tood_shapes_tune``, generated apart from ``tood_shapes_val``); the setting with the
   best box AP there is the detector's. A control (``Detector.tuned_like``) takes its detector's setting instead.
2. **Seeds**: each detector's setting is trained with every seed (the sweep's run is the first seed's).
3. **Test**: every seed's final checkpoint is evaluated on the test split (``tood_shapes_val``) twice, with the
   detector's own post-processing and with :data:`MATCHED_POSTPROCESSING` (the same score threshold, candidates,
   NMS and detections per image for all), and its alignment is measured (:mod:`tood.alignment`).

Written into the output folder: ``results.json`` (everything below, per seed), ``results.md``
(:func:`format_results`: the sweep, the test AP as mean ± standard deviation over the seeds with each post-processing,
the alignment metrics likewise) and ``ap.png`` (:func:`plot_results`). Every run and every evaluation is kept in its
own folder and reused when the study runs again, so an interrupted study resumes where it stopped.
"""

import contextlib
import json
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyCall as L
from detectron2.utils.logger import setup_logger
from matplotlib.figure import Figure
from tabulate import tabulate

from tood.engine.arguments import argument_parser
from tood.engine.training import do_train, evaluate_checkpoint, setup

from .alignment_report import alignment_report

__all__ = [
    "MATCHED_POSTPROCESSING",
    "SWEEP",
    "Detector",
    "Setting",
    "format_results",
    "plot_results",
    "run_protocol",
]

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ALIGNMENT_METRICS = ("pcc", "top1_agreement", "top1_iou", "nms_misrank_rate")
# One post-processing for every detector, applied to its final score (TOOD's P, RetinaNet's sigmoid, FCOS's
# sqrt(class x centerness)): Detectron2's usual 0.05 score threshold and 1000 candidates per level, TOOD's and
# FCOS's NMS IoU, 100 detections per image.
MATCHED_POSTPROCESSING = (
    "model.test_score_thresh=0.05",
    "model.test_topk_candidates=1000",
    "model.test_nms_thresh=0.6",
    "model.max_detections_per_image=100",
)


@dataclass(frozen=True)
class Setting:
    """An optimiser setting of the sweep: ``optimizer`` "AdamW" or "SGD" (momentum 0.9), its learning rate and
    weight decay. The config's parameter groups are kept (no weight decay on norms)."""

    optimizer: str
    lr: float
    weight_decay: float

    def __post_init__(self):
        if self.optimizer not in ("AdamW", "SGD"):
            raise ValueError(f"Setting.optimizer must be 'AdamW' or 'SGD', got {self.optimizer!r}")

    @property
    def name(self) -> str:
        return f"{self.optimizer.lower()}_lr{self.lr:g}_wd{self.weight_decay:g}"

    def apply(self, cfg) -> None:
        """Replaces ``cfg.optimizer`` by this setting's optimiser."""
        extra = {"momentum": 0.9} if self.optimizer == "SGD" else {}
        cfg.optimizer = L(getattr(torch.optim, self.optimizer))(
            params=cfg.optimizer.params, lr=self.lr, weight_decay=self.weight_decay, **extra
        )


# AdamW at the quick start's rate, at a third of it and at two and four times it (so that no detector's best rate
# is at the sweep's edge); SGD at the rate of Detectron2's RetinaNet and FCOS recipes (0.01, for a total batch of 16).
SWEEP = (
    Setting("AdamW", 1e-3, 0.05),
    Setting("AdamW", 3e-4, 0.05),
    Setting("AdamW", 2e-3, 0.05),
    Setting("AdamW", 4e-3, 0.05),
    Setting("SGD", 0.01, 1e-4),
)


@dataclass(frozen=True)
class Detector:
    """A model of the study: its LazyConfig, the overrides that make it (a control's), and, for a control, the
    detector whose selected setting it takes instead of a sweep of its own."""

    config_file: str
    opts: Tuple[str, ...] = ()
    tuned_like: Optional[str] = None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


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


def _finished(run_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(run_dir, f)) for f in ("model_final.pth", "metrics.json"))


def _final_ap(run_dir: str) -> Dict[str, float]:
    """The box metrics of a run's last evaluation (metrics.json)."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if "bbox/AP" in line]
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.json holds no box AP: the run was not evaluated")
    return {m: records[-1][f"bbox/{m}"] for m in METRICS}


def train(config_file: str, run_dir: str, setting: Setting, opts: Sequence[str]) -> Dict[str, float]:
    """Trains into ``run_dir`` as ``tools/train_net.py --resume`` does (continuing an unfinished run; a finished one
    is kept) and returns the box metrics of its final evaluation on ``dataloader.test``."""
    path = os.path.join(run_dir, "setting.json")
    if os.path.isfile(path):
        # A run kept or resumed must be this setting's: one trained with another would enter the tables silently.
        with open(path) as f:
            kept = json.load(f)
        if kept != setting.__dict__:
            raise RuntimeError(
                f"{run_dir} was trained with {kept}, not with {setting.__dict__}: move or delete it to train it anew"
            )
    if not _finished(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(setting.__dict__, f)
        args = argument_parser().parse_args(["--config-file", config_file, "--resume", *opts])
        args.opts.append(f"train.output_dir={run_dir}")
        with _own_log_files():
            cfg = setup(args, configure=setting.apply)
            do_train(args, cfg)
    return _final_ap(run_dir)


def evaluate(config_file: str, weights: str, out_dir: str, opts: Sequence[str]) -> Dict[str, float]:
    """Box metrics of ``weights`` evaluated as ``tools/train_net.py --eval-only`` does, kept in
    ``out_dir``/results.json (and read from there when it exists)."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        args = argument_parser().parse_args(["--config-file", config_file, "--eval-only", *opts])
        args.opts += [f"train.init_checkpoint={weights}", f"train.output_dir={out_dir}"]
        with _own_log_files():
            results = evaluate_checkpoint(args, setup(args))["bbox"]
        with open(path, "w") as f:
            json.dump({m: results[m] for m in METRICS}, f)
    with open(path) as f:
        return json.load(f)


def _alignment(config_file: str, weights: str, out_dir: str, dataset: str, max_images: int) -> Dict[str, float]:
    path = os.path.join(out_dir, "alignment.json")
    if not os.path.isfile(path):
        alignment_report(
            {"model": (config_file, weights)}, out_dir, dataset=dataset, max_images=max_images, num_figures=0
        )
    with open(path) as f:
        metrics = json.load(f)["models"]["model"]
    return {m: metrics[m] for m in ALIGNMENT_METRICS}


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_protocol(
    detectors: Dict[str, Detector],
    output_dir: str,
    *,
    settings: Sequence[Setting] = SWEEP,
    seeds: Sequence[int] = (0, 1, 2),
    max_iter: Optional[int] = None,
    tune_dataset: str = "tood_shapes_tune",
    test_dataset: str = "tood_shapes_val",
    alignment_images: int = 100,
    opts: Sequence[str] = (),
) -> Dict:
    """Runs (or resumes) the study; writes and prints its results.

    Args:
        detectors: name -> :class:`Detector`, in the order of the tables; a control's ``tuned_like`` must name a
            detector listed before it.
        settings: the sweep.
        seeds: ``train.seed`` of the runs; the sweep uses the first.
        max_iter: training iterations of every run (default: each config's ``train.max_iter``).
        alignment_images: test images on which the alignment of each run is measured.
        opts: key=value overrides of every config (data, batch, ...), applied before the detector's own.

    Returns:
        dict with ``sweep`` ({name: {setting name: tuning metrics}}), ``selected`` ({name: setting name}) and
        ``runs`` ({name: [{"seed", "own", "matched", "alignment"} per seed]}).
    """
    # Every detector in float32: Detectron2's RetinaNet and FCOS cannot train under CPU bfloat16 autocast, which the
    # quick-start TOOD config would choose on a CPU with bfloat16 units.
    common = ["train.amp.enabled=False", *opts, *([f"train.max_iter={max_iter}"] if max_iter else [])]

    def train_opts(detector: Detector, seed: int) -> List[str]:
        # Every run evaluates on the tuning split when it ends; the test split is only read in step 3.
        return [*common, *detector.opts, f"train.seed={seed}", f"dataloader.test.dataset.names={tune_dataset}"]

    sweep, selected = {}, {}
    for name, detector in detectors.items():
        if detector.tuned_like:
            if detector.tuned_like not in selected:
                raise ValueError(f"{name} is tuned like {detector.tuned_like}, which is not listed before it")
            selected[name] = selected[detector.tuned_like]
            continue
        sweep[name] = {}
        for setting in settings:
            run_dir = os.path.join(output_dir, "sweep", _slug(name), setting.name)
            print(f"sweep: {name} with {setting.name}, seed {seeds[0]}: {run_dir}", flush=True)
            sweep[name][setting.name] = train(detector.config_file, run_dir, setting, train_opts(detector, seeds[0]))
        selected[name] = max(settings, key=lambda s: sweep[name][s.name]["AP"])

    runs = {}
    for name, detector in detectors.items():
        setting = selected[name]
        runs[name] = []
        for seed in seeds:
            if seed == seeds[0] and not detector.tuned_like:
                run_dir = os.path.join(output_dir, "sweep", _slug(name), setting.name)
            else:
                run_dir = os.path.join(output_dir, "seeds", _slug(name), setting.name, f"seed{seed}")
                print(f"seeds: {name} with {setting.name}, seed {seed}: {run_dir}", flush=True)
                train(detector.config_file, run_dir, setting, train_opts(detector, seed))
            weights = os.path.join(run_dir, "model_final.pth")
            test_opts = [*common, *detector.opts, f"dataloader.test.dataset.names={test_dataset}"]
            runs[name].append(
                {
                    "seed": seed,
                    "run_dir": run_dir,
                    "own": evaluate(detector.config_file, weights, os.path.join(run_dir, "test_own"), test_opts),
                    "matched": evaluate(
                        detector.config_file,
                        weights,
                        os.path.join(run_dir, "test_matched"),
                        [*test_opts, *MATCHED_POSTPROCESSING],
                    ),
                    "alignment": _alignment(
                        detector.config_file, weights, f"{run_dir}/alignment", test_dataset, alignment_images
                    ),
                }
            )

    results = {"sweep": sweep, "selected": {n: s.name for n, s in selected.items()}, "runs": runs}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = format_results(results, tune_dataset, test_dataset)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table)
    plot_path = os.path.join(output_dir, "ap.png")
    plot_results(results, plot_path)
    print(f"\n{table}\nPlot: {plot_path}")
    return results


def _pm(values: Sequence[Optional[float]], spec: str = ".1f") -> str:
    mean, std = _mean_std(values)
    return "-" if mean is None else f"{mean:{spec}} ± {std:{spec}}"


def format_results(results: Dict, tune_dataset: str = "tood_shapes_tune", test_dataset: str = "tood_shapes_val") -> str:
    """Markdown tables of :func:`run_protocol`'s results: the sweep, the test AP with each post-processing, the
    alignment."""
    settings = sorted({s for by_setting in results["sweep"].values() for s in by_setting})
    rows = [
        [name, *(f"{by[s]['AP']:.1f}" + (" *" if results["selected"][name] == s else "") for s in settings)]
        for name, by in results["sweep"].items()
    ]
    sweep_table = tabulate(rows, ["model", *settings], tablefmt="pipe", disable_numparse=True)

    def test_table(key: str) -> str:
        rows = []
        for name, runs in results["runs"].items():
            per_seed = ", ".join(f"{r[key]['AP']:.1f}" for r in runs)
            rows.append([name, results["selected"][name], *(_pm([r[key][m] for r in runs]) for m in METRICS), per_seed])
        headers = ["model", "setting", *METRICS, "AP per seed"]
        return tabulate(rows, headers, tablefmt="pipe", disable_numparse=True)

    rows = [
        [name, *(_pm([r["alignment"][m] for r in runs], ".3f") for m in ALIGNMENT_METRICS)]
        for name, runs in results["runs"].items()
    ]
    alignment_table = tabulate(rows, ["model", *ALIGNMENT_METRICS], tablefmt="pipe", disable_numparse=True)
    num_seeds = max(len(runs) for runs in results["runs"].values())
    return (
        f"Sweep: box AP on {tune_dataset} after training with each setting (* the setting kept):\n\n{sweep_table}\n\n"
        f"Box AP on {test_dataset}, mean ± standard deviation over {num_seeds} seeds, each detector's own "
        f"post-processing:\n\n{test_table('own')}\n\n"
        f"The same checkpoints with one post-processing for all ({', '.join(MATCHED_POSTPROCESSING)}):\n\n"
        f"{test_table('matched')}\n\nAlignment on {test_dataset} (tood.alignment), mean ± standard deviation over "
        f"the seeds:\n\n{alignment_table}\n"
    )


def plot_results(results: Dict, path: str) -> None:
    """Test AP of each model, mean and standard deviation over the seeds, with its own and with the matched
    post-processing; every seed as a dot."""
    fig = Figure(figsize=(9, 4.5), tight_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    names = list(results["runs"])
    width = 0.38
    for offset, key, label in ((-width / 2, "own", "own post-processing"), (width / 2, "matched", "matched")):
        values: List[List[float]] = [[r[key]["AP"] for r in results["runs"][n]] for n in names]
        x = [i + offset for i in range(len(names))]
        stats = [_mean_std(v) for v in values]
        ax.bar(x, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=4, alpha=0.7, label=label)
        for xi, v in zip(x, values):
            ax.plot([xi] * len(v), v, "k.", markersize=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("box AP (%)")
    ax.set_title("test box AP: mean ± std over seeds (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
