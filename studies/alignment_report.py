"""The alignment report (``tools/analyze_alignment.py``): :mod:`tood.alignment`'s metrics for several models on one
dataset, as a table, a score-vs-IoU scatter plot and the score and IoU maps of a few objects."""

import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data.detection_utils import convert_image_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from tabulate import tabulate

from tood.alignment import DensePredictions, ObjectMaps, evaluate_alignment, object_maps
from tood.engine.predictor import dataset_metadata

__all__ = ["alignment_report", "draw_object_maps", "draw_scatter", "format_table"]

logger = logging.getLogger(__name__)


def draw_object_maps(image: np.ndarray, maps: ObjectMaps, gt_box: np.ndarray, title: str, path: str) -> None:
    """Score map and IoU map side by side over ``image`` (H, W, 3) uint8 RGB, each cell at its location; red star:
    cell of the highest score, green: of the highest IoU; ``gt_box`` (4,) xyxy drawn in white."""
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


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def draw_scatter(points: Dict[str, Tuple[np.ndarray, np.ndarray, Dict]], path: str) -> None:
    """One panel per model: score against IoU of sampled candidates; ``points``: name -> (ious (P,), scores (P,),
    metrics of :meth:`AlignmentEvaluator.evaluate`)."""
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


_TABLE_METRICS = ("pcc", "top1_agreement", "top1_iou", "nms_misrank_rate")
_TABLE_HEADERS = ("model", "PCC", "top-1 agreement", "top-1 IoU", "NMS misrank", "objects", "PCC objects", "NMS kept")


def format_table(results: Dict[str, Dict]) -> str:
    """Markdown table of model name -> metrics of :meth:`AlignmentEvaluator.evaluate`."""
    rows = [
        [name, *(_fmt(m[k]) for k in _TABLE_METRICS), m["num_objects"], m["pcc_objects"], m["nms_kept"]]
        for name, m in results.items()
    ]
    return tabulate(rows, headers=_TABLE_HEADERS, tablefmt="pipe", stralign="right", disable_numparse=True)


def _analyze_model(
    name: str,
    config_file: str,
    weights: str,
    opts: Sequence[str],
    dataset: Optional[str],
    maps_dir: str,
    num_figures: int,
    min_iou: float,
    max_images: Optional[int],
) -> Tuple[Dict, np.ndarray, np.ndarray]:
    """Metrics, and the (IoU, score) scatter samples, of one model; draws its object maps into ``maps_dir``."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(opts))
    if dataset:
        cfg.dataloader.test.dataset.names = dataset
    # Detectron2's DatasetMapper drops the annotations otherwise; the test augmentations are unchanged.
    cfg.dataloader.test.mapper.is_train = True
    device = cfg.get("train", {}).get("device", "cuda" if torch.cuda.is_available() else "cpu")
    model = instantiate(cfg.model).to(device).eval()
    DetectionCheckpointer(model).load(weights)
    data_loader = instantiate(cfg.dataloader.test)  # loads the dataset, which sets its metadata
    dataset = cfg.dataloader.test.dataset.names
    dataset = dataset if isinstance(dataset, str) else list(dataset)
    classes = dataset_metadata(dataset).get("thing_classes")
    image_format = cfg.dataloader.test.mapper.image_format
    drawn = []

    def draw(inputs: Dict, dense: DensePredictions) -> None:
        gt = inputs["instances"]
        if len(drawn) >= num_figures or len(gt) == 0:
            return
        # The largest object that has candidates.
        for g in gt.gt_boxes.area().argsort(descending=True).tolist():
            label = int(gt.gt_classes[g])
            maps = object_maps(dense, gt.gt_boxes.tensor[g].to(dense.boxes.device), label, min_iou)
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

    evaluator = evaluate_alignment(model, data_loader, min_iou=min_iou, max_images=max_images, on_image=draw)
    metrics = evaluator.evaluate()
    metrics.update(config=config_file, weights=weights, dataset=dataset, figures=drawn)
    return (metrics, *evaluator.scatter_points())


def alignment_report(
    models: Dict[str, Tuple[str, str]],
    output_dir: str,
    *,
    opts: Sequence[str] = (),
    dataset: Optional[str] = None,
    max_images: Optional[int] = None,
    num_figures: int = 4,
    min_iou: float = 0.1,
) -> Dict[str, Dict]:
    """The metrics of each model on its config's test loader, printed as a table and written into ``output_dir``.

    Each model is built from its LazyConfig (with the ``opts`` overrides, and ``dataset`` as the test dataset if
    given) and loaded with DetectionCheckpointer; the ground truth comes from the test loader with its mapper
    switched to ``is_train=True``. Written: ``alignment.json`` ({"models": the returned metrics, "table": the
    Markdown table}), ``scatter.png`` (:func:`draw_scatter`) and, for the first ``num_figures`` images with
    objects, the maps of the largest object with candidates (``maps/NAME_IMAGEID.png``, :func:`draw_object_maps`).

    Args:
        models: name -> (config file, weights).
        max_images: stop after this many images.
        min_iou: a candidate's least IoU with its object.

    Returns:
        name -> metrics of :meth:`AlignmentEvaluator.evaluate`, with the model's ``config``, ``weights``,
        ``dataset`` and ``figures`` (the maps drawn).
    """
    maps_dir = os.path.join(output_dir, "maps")
    os.makedirs(maps_dir, exist_ok=True)
    results, points = {}, {}
    for name, (config_file, weights) in models.items():
        logger.info(f"Analysing {name}: {config_file} with {weights}")
        metrics, ious, scores = _analyze_model(
            name, config_file, weights, opts, dataset, maps_dir, num_figures, min_iou, max_images
        )
        results[name] = metrics
        points[name] = (ious, scores, metrics)

    table = format_table(results)
    print(table)
    with open(os.path.join(output_dir, "alignment.json"), "w") as f:
        json.dump({"models": results, "table": table}, f, indent=2)
    draw_scatter(points, os.path.join(output_dir, "scatter.png"))
    logger.info(f"Wrote alignment.json, scatter.png and maps/ to {output_dir}")
    return results
