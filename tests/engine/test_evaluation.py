"""Detectron2's COCOEvaluator as tools/train_net.py runs it (``inference_on_dataset``, its fast implementation only
where detectron2's compiled ops exist), checked against known answers.

(a) predictions equal to the ground truth of a generated shapes dataset give box AP 100;
(b) a hand-built case (true positives, a duplicate, false positives, a miss, two classes with non-contiguous COCO
    ids) gives the AP, AP50 and AP75 computed by hand and by pycocotools' COCOeval directly on the same json files.
"""

import contextlib
import io
import json

import detectron2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from tood.data import ShapesConfig, register_shapes_dataset

# tools/train_net.py's condition: COCOeval_opt is one of detectron2's compiled ops, absent from the placeholder.
USE_FAST_IMPL = not getattr(detectron2._C, "IS_TOOD_PLACEHOLDER", False)


class _FixedPredictions(nn.Module):
    """A "model" that returns given detections per image id: (boxes XYXY, scores, contiguous classes)."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            boxes, scores, classes = self.predictions.get(inputs["image_id"], ([], [], []))
            instances = Instances((inputs["height"], inputs["width"]))
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.tensor(scores, dtype=torch.float32)
            instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
            outputs.append({"instances": instances})
        return outputs


@contextlib.contextmanager
def _registered(name, register):
    register()
    try:
        yield
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _evaluate(name, predictions, output_dir):
    """Box metrics (percent) of ``predictions`` on dataset ``name``, as tools/train_net.py's evaluation computes
    them: the dataset is loaded first (it fills the metadata's id mapping), then ``inference_on_dataset``."""
    dataset = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, output_dir=str(output_dir), use_fast_impl=USE_FAST_IMPL)
    batches = [[{k: d[k] for k in ("image_id", "height", "width")}] for d in dataset]
    return inference_on_dataset(_FixedPredictions(predictions), batches, evaluator)["bbox"]


def test_ground_truth_as_predictions_scores_ap_100(tmp_path):
    name = "tood_test_shapes_eval"
    # Small and varied: several classes, up to 12 objects an image, and crowded images.
    config = ShapesConfig(object_size=(12, 48), crowded_object_size=(8, 24), crowded_prob=0.3, empty_prob=0.2)
    with _registered(
        name, lambda: register_shapes_dataset(name, 12, seed=3, image_size=96, config=config, root=tmp_path)
    ):
        dataset = DatasetCatalog.get(name)
        assert sum(len(d["annotations"]) for d in dataset) >= 20
        assert len({a["category_id"] for d in dataset for a in d["annotations"]}) >= 3
        predictions = {
            d["image_id"]: (
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]],
                [1.0] * len(d["annotations"]),
                [a["category_id"] for a in d["annotations"]],
            )
            for d in dataset
        }
        metrics = _evaluate(name, predictions, tmp_path / "inference")
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(100.0), (key, metrics)


# The hand-built case: three 100 x 100 images, classes "a" (COCO id 1) and "b" (COCO id 3); boxes XYWH.
_A, _B = 1, 3
_GT = [  # (image id, category id, box)
    (1, _A, [10, 10, 30, 30]),
    (2, _A, [50, 50, 40, 40]),
    (3, _A, [20, 20, 40, 40]),  # never detected
    (1, _B, [60, 10, 30, 30]),
    (2, _B, [10, 60, 30, 30]),
]
_DETECTIONS = [  # (image id, category id, box, score)
    (1, _A, [10, 10, 30, 30], 0.9),  # exact: true positive at every IoU threshold
    (1, _A, [13, 10, 30, 30], 0.8),  # duplicate of the same object (IoU 27/33): always a false positive
    (2, _A, [59, 50, 40, 40], 0.7),  # IoU 31/49 = 0.63: true positive at thresholds 0.5, 0.55, 0.6 only
    (3, _A, [70, 70, 25, 25], 0.6),  # no overlap: false positive
    (1, _B, [60, 10, 30, 30], 0.95),  # exact
    (3, _B, [40, 40, 20, 20], 0.85),  # no object of class b in image 3: false positive, ranked second
    (2, _B, [13, 60, 30, 30], 0.5),  # IoU 27/33 = 0.82: true positive at thresholds 0.5 ... 0.8 only
]


# By hand. COCO's AP of a class at one IoU threshold: rank its detections by score, make precision monotone
# (the best precision at any higher recall), read it at the 101 recall points 0, 0.01, ..., 1 and average.
# Class a (3 objects) ranks TP, FP, TP-or-FP, FP: precision 1 up to recall 1/3 (the 34 points 0 ... 0.33), then,
# while the IoU-0.63 detection counts, 2/3 up to recall 2/3 (the 33 points 0.34 ... 0.66), then 0.
_AP_A = {"iou 0.63 counts": (34 + 33 * 2 / 3) / 101, "not": 34 / 101}
# Class b (2 objects) ranks TP, FP, TP-or-FP: precision 1 up to recall 1/2 (51 points), then, while the IoU-0.82
# detection counts, 2/3 up to recall 1 (50 points).
_AP_B = {"iou 0.82 counts": (51 + 50 * 2 / 3) / 101, "not": 51 / 101}
# AP averages the classes and the IoU thresholds 0.5, 0.55, ..., 0.95: 0.63 counts at 3 of them, 0.82 at 7.
_EXPECTED_AP50 = (_AP_A["iou 0.63 counts"] + _AP_B["iou 0.82 counts"]) / 2
_EXPECTED_AP75 = (_AP_A["not"] + _AP_B["iou 0.82 counts"]) / 2
_EXPECTED_AP = (3 * _AP_A["iou 0.63 counts"] + 7 * _AP_A["not"] + 7 * _AP_B["iou 0.82 counts"] + 3 * _AP_B["not"]) / 20


def test_hand_built_case_matches_hand_computation_and_pycocotools(tmp_path):
    gt_file, det_file = tmp_path / "gt.json", tmp_path / "detections.json"
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100} for i in (1, 2, 3)],
        "categories": [{"id": _A, "name": "a"}, {"id": _B, "name": "b"}],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for k, (i, c, box) in enumerate(_GT)
        ],
    }
    gt_file.write_text(json.dumps(gt))
    det_file.write_text(
        json.dumps([{"image_id": i, "category_id": c, "bbox": box, "score": s} for i, c, box, s in _DETECTIONS])
    )

    # pycocotools directly on the two files.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(det_file)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    direct = coco_eval.stats[:3]
    np.testing.assert_allclose(direct, [_EXPECTED_AP, _EXPECTED_AP50, _EXPECTED_AP75], rtol=1e-12)
    assert direct[0] < direct[2] < direct[1]  # a case that tells the three apart

    # COCOEvaluator on the same ground truth, fed the same detections as model outputs (contiguous class ids).
    name = "tood_test_hand_built_eval"
    contiguous = {_A: 0, _B: 1}
    predictions = {}
    for i, c, (x, y, w, h), s in _DETECTIONS:
        boxes, scores, classes = predictions.setdefault(i, ([], [], []))
        boxes.append([x, y, x + w, y + h])
        scores.append(s)
        classes.append(contiguous[c])
    with _registered(name, lambda: register_coco_instances(name, {}, str(gt_file), str(tmp_path))):
        metrics = _evaluate(name, predictions, tmp_path / "inference")
    assert [metrics["AP"], metrics["AP50"], metrics["AP75"]] == pytest.approx(100 * direct, rel=1e-6)
    # Per class as well: class b's detections are found under its COCO id 3.
    per_class = coco_eval.eval["precision"][:, :, :, 0, 2].mean(axis=(0, 1))  # IoU, recall -> class
    assert [metrics["AP-a"], metrics["AP-b"]] == pytest.approx(100 * per_class, rel=1e-6)
