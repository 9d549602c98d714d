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
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.logger import setup_logger
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from tabulate import tabulate

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from tood.alignment import DensePredictions, ObjectMaps, evaluate_alignment, object_maps

logger = setup_logger(name="analyze_alignment")

METRICS = ("pcc", "top1_agreement", "top1_iou", "nms_misrank_rate")
HEADERS = ("model", "PCC", "top-1 agreement", "top-1 IoU", "NMS misrank", "objects", "PCC objects", "NMS kept")


def parse_compare(spec: str) -> Tuple[str, str, str]:
    """``NAME=CONFIG:WEIGHTS`` -> (name, config, weights); the weights may be a URL (split at the first ':')."""
    name, sep, rest = spec.partition("=")
    config, sep2, weights = rest.partition(":")
    if not (sep and sep2 and name and config and weights):
        raise argparse.ArgumentTypeError(f"expected NAME=CONFIG:WEIGHTS, got {spec!r}")
    return name, config, weights


def load(config_file: str, weights: str, opts: List[str], dataset: Optional[str]):
    """The config (with overrides, dataset, and a test mapper that keeps annotations) and the loaded model."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    if dataset:
        cfg.dataloader.test.dataset.names = dataset
    cfg.dataloader.test.mapper.is_train = True
    train = cfg.get("train", {})
    device = train.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    model = instantiate(cfg.model).to(device).eval()
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def draw_object_maps(image: np.ndarray, maps: ObjectMaps, gt_box: np.ndarray, title: str, path: str) -> None:
    """Score map and IoU map side by side over ``image`` (H, W, 3) uint8 RGB, each cell at its location."""
    s, off = maps.stride, maps.cell_offset
    h, w = maps.score.shape
    # Cell (x, y) is centred at ((x + off) * s, (y + off) * s) and spans one stride.
    extent = (off * s - s / 2, (w + off) * s - s / 2, (h + off) * s - s / 2, off * s - s / 2)
    score, iou = maps.score.cpu().numpy(), maps.iou.cpu().numpy()
    marks = [
        (np.unravel_index(score.argmax(), score.shape), "red"),
        (np.unravel_index(iou.argmax(), iou.shape), "lime"),
    ]
    fig = Figure(figsize=(10, 5), tight_layout=True)
    panels = [("classification score", score, max(float(score.max()), 1e-6)), ("IoU with the object", iou, 1.0)]
    for i, (name, values, vmax) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.imshow(image)
        shown = ax.imshow(values, extent=extent, cmap="jet", alpha=0.55, vmin=0.0, vmax=vmax, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        x0, y0, x1, y1 = gt_box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        for (cy, cx), colour in marks:
            ax.plot((cx + off) * s, (cy + off) * s, marker="*", markersize=14, color=colour, markeredgecolor="k")
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f"{name} (stride {s})")
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def draw_scatter(points: Dict[str, Tuple[np.ndarray, np.ndarray, Dict]], path: str) -> None:
    """One panel per model: score against IoU of sampled candidates; ``points``: name -> (ious, scores, metrics)."""
    fig = Figure(figsize=(4.5 * len(points), 4.5), tight_layout=True)
    for i, (name, (ious, scores, metrics)) in enumerate(points.items()):
        ax = fig.add_subplot(1, len(points), i + 1)
        ax.scatter(ious, scores, s=3, alpha=0.3, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("IoU with the object")
        ax.set_ylabel("classification score of the object's class")
        ax.set_title(f"{name}: PCC {_fmt(metrics['pcc'])}, {len(ious)} points")
    fig.savefig(path, dpi=100)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: Dict[str, Dict]) -> str:
    rows = [
        [name, *(_fmt(m[k]) for k in METRICS), m["num_objects"], m["pcc_objects"], m["nms_kept"]]
        for name, m in results.items()
    ]
    return tabulate(rows, headers=HEADERS, tablefmt="pipe", stralign="right", disable_numparse=True)


def analyze_model(name: str, config_file: str, weights: str, args) -> Tuple[Dict, np.ndarray, np.ndarray]:
    """Metrics, and the (IoU, score) scatter samples, of one model; draws its object maps."""
    cfg, model = load(config_file, weights, args.opts, args.dataset)
    data_loader = instantiate(cfg.dataloader.test)  # loads the dataset, which sets its metadata
    dataset = cfg.dataloader.test.dataset.names
    dataset = dataset if isinstance(dataset, str) else list(dataset)
    classes = MetadataCatalog.get(dataset if isinstance(dataset, str) else dataset[0]).get("thing_classes")
    image_format = cfg.dataloader.test.mapper.image_format
    maps_dir = os.path.join(args.output, "maps")
    os.makedirs(maps_dir, exist_ok=True)
    drawn = []

    def draw(inputs: Dict, dense: DensePredictions) -> None:
        gt = inputs["instances"]
        if len(drawn) >= args.num_figures or len(gt) == 0:
            return
        # The largest object that has candidates.
        for g in gt.gt_boxes.area().argsort(descending=True).tolist():
            label = int(gt.gt_classes[g])
            maps = object_maps(dense, gt.gt_boxes.tensor[g].to(dense.boxes.device), label, args.min_iou)
            if maps is not None:
                break
        else:
            return
        image = convert_image_to_rgb(inputs["image"].permute(1, 2, 0).numpy(), image_format)
        class_name = classes[label] if classes else str(label)
        image_id = inputs.get("image_id", len(drawn))
        path = os.path.join(maps_dir, f"{name}_{image_id}.png")
        draw_object_maps(image, maps, gt.gt_boxes.tensor[g].numpy(), f"{name}, image {image_id}: {class_name}", path)
        drawn.append(path)

    evaluator = evaluate_alignment(model, data_loader, min_iou=args.min_iou, max_images=args.max_images, on_image=draw)
    metrics = evaluator.evaluate()
    metrics.update(config=config_file, weights=weights, dataset=dataset, figures=drawn)
    return (metrics, *evaluator.scatter_points())


def argument_parser() -> argparse.ArgumentParser:
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


def main(argv=None) -> Dict[str, Dict]:
    """Runs the tool; returns model name -> metrics (what alignment.json holds under "models")."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.compare and (args.config_file or args.weights):
        parser.error("use either --compare or --config-file/--weights")
    if not args.compare and not (args.config_file and args.weights):
        parser.error("--config-file and --weights are required (or --compare NAME=CONFIG:WEIGHTS ...)")
    specs = args.compare or [(Path(args.config_file).stem, args.config_file, args.weights)]
    if len({name for name, _, _ in specs}) != len(specs):
        parser.error("model names must be unique")
    os.makedirs(args.output, exist_ok=True)

    results, points = {}, {}
    for name, config_file, weights in specs:
        logger.info(f"Analysing {name}: {config_file} with {weights}")
        metrics, ious, scores = analyze_model(name, config_file, weights, args)
        results[name] = metrics
        points[name] = (ious, scores, metrics)

    table = format_table(results)
    print(table)
    with open(os.path.join(args.output, "alignment.json"), "w") as f:
        json.dump({"models": results, "table": table}, f, indent=2)
    draw_scatter(points, os.path.join(args.output, "scatter.png"))
    logger.info(f"Wrote alignment.json, scatter.png and maps/ to {args.output}")
    return results


if __name__ == "__main__":
    main()
