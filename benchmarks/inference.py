"""Inference of one image in several precisions and runtimes, side by side: latency, and how far each one's detections
are from float32 PyTorch's (``tools/benchmark_inference.py``)."""

import os
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.structures import Instances, pairwise_iou
from torch import Tensor

from tood.export import ExportedTOOD
from tood.precision import inference_autocast

from .timing import median_times

__all__ = ["detection_changes", "inference_runners", "inference_table", "markdown_table"]


def detection_changes(reference: Instances, other: Instances, iou: float = 0.5) -> Dict[str, float]:
    """What changes from ``reference``'s detections of an image to ``other``'s.

    Detections are paired greedily in the order of ``reference``'s scores, each with the unpaired detection of
    ``other`` of the same class that overlaps it most, at IoU ``iou`` or more.

    Returns:
        ``reference``, ``other``: the counts; ``paired``; ``lost`` / ``new``: detections of ``reference`` /
        ``other`` left unpaired, with ``lost_max_score`` / ``new_max_score`` the highest score among them (0 if
        none); over the pairs, ``box_max`` / ``box_median``: the largest coordinate difference in pixels,
        ``score_max`` / ``score_median``: the score difference.
    """
    overlaps = pairwise_iou(reference.pred_boxes, other.pred_boxes)
    overlaps[reference.pred_classes[:, None] != other.pred_classes[None]] = -1
    pairs = []
    for i in reference.scores.argsort(descending=True).tolist():
        if overlaps.shape[1] == 0:
            break
        best, j = overlaps[i].max(dim=0)
        if best >= iou:
            pairs.append((i, int(j)))
            overlaps[:, j] = -1
    ref_index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    other_index = torch.tensor([j for _, j in pairs], dtype=torch.long)
    box = (reference.pred_boxes.tensor[ref_index] - other.pred_boxes.tensor[other_index]).abs().amax(dim=1)
    score = (reference.scores[ref_index] - other.scores[other_index]).abs()

    def highest_unpaired(instances, paired):
        mask = torch.ones(len(instances), dtype=torch.bool)
        mask[paired] = False
        return int(mask.sum()), float(instances.scores[mask].max()) if mask.any() else 0.0

    lost, lost_max = highest_unpaired(reference, ref_index)
    new, new_max = highest_unpaired(other, other_index)
    return {
        "reference": len(reference),
        "other": len(other),
        "paired": len(pairs),
        "lost": lost,
        "lost_max_score": lost_max,
        "new": new,
        "new_max_score": new_max,
        "box_max": float(box.max()) if pairs else 0.0,
        "box_median": float(box.median()) if pairs else 0.0,
        "score_max": float(score.max()) if pairs else 0.0,
        "score_median": float(score.median()) if pairs else 0.0,
    }


def inference_table(runners: Dict[str, Callable[[], Instances]], iters: int, warmup: int = 1) -> List[Dict]:
    """Times ``runners`` (name -> a call that predicts one image) in turn, ``warmup + iters`` rounds, and compares each
    one's detections with the first runner's (:func:`detection_changes`).

    Returns:
        one row per runner: ``name``, ``ms`` (median), ``speedup`` (the first runner's time / this one's) and the
        changes.
    """
    with torch.no_grad():
        seconds = median_times(runners, iters, warmup=warmup)
        detections = {name: run() for name, run in runners.items()}
    first = next(iter(runners))
    return [
        {
            "name": name,
            "ms": 1000 * seconds[name],
            "speedup": seconds[first] / seconds[name],
            **detection_changes(detections[first], detections[name]),
        }
        for name in runners
    ]


def inference_runners(model, image: Tensor, exported_dirs: Sequence[str] = ()) -> Dict[str, Callable[[], Instances]]:
    """name -> a call predicting ``image`` ((3, H, W), resized for the model): the PyTorch ``model`` in float32 and in
    bfloat16 autocast, then the exported model of each of ``exported_dirs`` (in its own precision)."""

    def pytorch(bf16):
        def run():
            with inference_autocast(bf16):
                return model([{"image": image}])[0]["instances"]

        return run

    runners = {"PyTorch, float32": pytorch(False), "PyTorch, bfloat16 autocast": pytorch(True)}
    for folder in exported_dirs:
        exported = ExportedTOOD(folder, num_threads=torch.get_num_threads())
        name = f"{exported.format} ({os.path.basename(os.path.normpath(folder))}), "
        runners[name + ("bfloat16 autocast" if exported.bf16 else "float32")] = lambda exported=exported: exported(
            image
        )
    return runners


def markdown_table(rows: List[Dict]) -> str:
    """The rows of :func:`inference_table` as a markdown table."""
    lines = [
        "| runner | ms | speed-up | detections | lost (top score) | new (top score) | box max / median px | "
        "score max / median |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ms']:.0f} | {r['speedup']:.2f}x | {r['other']} "
            f"| {r['lost']} ({r['lost_max_score']:.3f}) | {r['new']} ({r['new_max_score']:.3f}) "
            f"| {r['box_max']:.3g} / {r['box_median']:.3g} | {r['score_max']:.3g} / {r['score_median']:.3g} |"
        )
    return "\n".join(lines)
