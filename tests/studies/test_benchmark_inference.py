"""tools/benchmark_inference.py and benchmarks/inference.py: the pairing of two detection sets against a hand-built
case, and the tool end to end on a small model with an exported one. Checks what the tool reports, not how fast
anything is."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from benchmarks.inference import detection_changes
from tests.conftest import REPO_ROOT, load_tool
from tood.data import generate_dataset
from tood.export import export_model


def instances(rows):
    """Instances of a 200 x 200 image from rows of (x0, y0, x1, y1, score, class)."""
    result = Instances((200, 200))
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    result.pred_boxes, result.scores, result.pred_classes = Boxes(t[:, :4]), t[:, 4], t[:, 5].long()
    return result


def test_detection_changes_of_a_hand_built_case():
    reference = instances([[0, 0, 10, 10, 0.9, 0], [20, 20, 40, 40, 0.8, 1], [50, 50, 60, 60, 0.3, 0]])
    other = instances(
        [
            [0, 0, 10, 10.5, 0.88, 0],  # IoU 100 / 105: paired, 0.5 px, score 0.02
            [20, 20, 40, 40, 0.8, 2],  # same box, another class: the class-1 detection is lost, this one new
            [50, 50, 60, 61, 0.31, 0],  # IoU 100 / 110: paired, 1 px, score 0.01
            [100, 100, 110, 110, 0.1, 0],  # overlaps nothing: new
        ]
    )
    changes = detection_changes(reference, other)
    assert {k: changes[k] for k in ("reference", "other", "paired", "lost", "new")} == {
        "reference": 3,
        "other": 4,
        "paired": 2,
        "lost": 1,
        "new": 2,
    }
    assert changes["lost_max_score"] == pytest.approx(0.8) and changes["new_max_score"] == pytest.approx(0.8)
    assert changes["box_max"] == pytest.approx(1.0)
    assert changes["score_max"] == pytest.approx(0.02, abs=1e-6)
    # torch's median of two values is the lower one
    assert changes["box_median"] == pytest.approx(0.5) and changes["score_median"] == pytest.approx(0.01, abs=1e-6)


def test_pairing_is_greedy_by_reference_score_and_one_to_one():
    """The best-scored reference detection takes the detection it overlaps most; the next one cannot take it again,
    and one below IoU 0.5 stays unpaired."""
    reference = instances([[0, 0, 10, 10, 0.5, 0], [1, 0, 11, 10, 0.9, 0]])
    other = instances([[1, 0, 11, 10, 0.9, 0], [4, 0, 14, 10, 0.5, 0]])  # IoU with the first: 9/11 and 6/14
    changes = detection_changes(reference, other)
    assert (changes["paired"], changes["lost"], changes["new"]) == (1, 1, 1)
    assert changes["box_max"] == 0.0
    assert detection_changes(reference, instances([]))["lost"] == 2


def test_the_tool_compares_precisions_and_an_exported_model(tmp_path):
    config = str(REPO_ROOT / "configs" / "quickstart_shapes.py")
    cfg = LazyConfig.load(config)
    model = instantiate(cfg.model).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    generate_dataset(tmp_path / "data", num_images=1, seed=0, image_size=160)
    image = str(tmp_path / "data" / "images" / "000000.jpg")
    size = ["dataloader.test.mapper.augmentations.0.short_edge_length=160", "model.test_score_thresh=0.0"]
    model.test_score_thresh = 0.0
    export_model(model, torch.zeros(3, 160, 160), str(tmp_path / "pt2"), "pt2")

    tool = load_tool("benchmark_inference")
    args = ["--config-file", config, "--weights", str(tmp_path / "model.pth"), "--image", image, "--threads", "1"]
    args += ["--exported", str(tmp_path / "pt2"), "--runs", "1", "--warmup", "0", *size]
    rows = tool.main(tool.argument_parser().parse_args(args))
    assert [r["name"] for r in rows] == ["PyTorch, float32", "PyTorch, bfloat16 autocast", "pt2 (pt2), float32"]
    first, bf16, exported = rows
    assert first["speedup"] == 1.0 and first["paired"] == first["reference"] == 100  # itself, max_detections
    assert (first["lost"], first["new"], first["box_max"], first["score_max"]) == (0, 0, 0.0, 0.0)
    # The float32 ExportedProgram runs the model's own ops: PyTorch's detections exactly.
    assert (exported["paired"], exported["box_max"], exported["score_max"]) == (100, 0.0, 0.0)
    assert bf16["other"] == 100 and bf16["paired"] + bf16["lost"] == 100 and min(r["ms"] for r in rows) > 0
