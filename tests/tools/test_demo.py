"""tools/demo.py: weights through DetectionCheckpointer, images / folders / globs / a video in, drawn detections out."""

import sys

import cv2
import numpy as np
import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from tests.conftest import REPO_ROOT
from tood.data import generate_dataset, get_shapes_dataset

sys.path.insert(0, str(REPO_ROOT / "tools"))
import demo  # noqa: E402

from tood.engine import LazyPredictor, dataset_metadata  # noqa: E402
from tood.engine.arguments import register_coco_datasets  # noqa: E402

CONFIG = str(REPO_ROOT / "configs" / "quickstart_shapes.py")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained quick-start model: its scores sit near the 0.01 prior, so tests lower the thresholds."""
    folder = tmp_path_factory.mktemp("weights")
    model = instantiate(LazyConfig.load(CONFIG).model)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    generate_dataset(folder, num_images=3, seed=0, image_size=96)
    return folder / "images"


def run_demo(weights, *args):
    # Thresholds at 0 so the untrained model detects; 5 boxes an image and the 96 px size keep it quick.
    opts = [
        "--opts",
        f"train.init_checkpoint={weights}",
        "train.device=cpu",
        "model.test_score_thresh=0.0",
        "model.max_detections_per_image=5",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=96",
    ]
    return demo.main(demo.argument_parser().parse_args(["--config-file", CONFIG, *args, *opts]))


def changed_fraction(source, drawn):
    """Fraction of pixels changed by more than JPEG re-encoding changes them."""
    return (np.abs(drawn.astype(int) - source).max(axis=2) > 60).mean()


def test_images_folder_and_glob(weights, images, tmp_path):
    single = str(images / "000002.jpg")
    written = run_demo(
        weights,
        "--input",
        str(images),
        single,
        str(images / "00000[01].jpg"),
        "--output",
        str(tmp_path),
        "--confidence-threshold",
        "0.0",
    )
    names = ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert [p.split("/")[-1] for p in written] == names + ["000002.jpg"] + names[:2]
    for name in names:
        source, drawn = cv2.imread(str(images / name)), cv2.imread(str(tmp_path / name))
        assert drawn.shape == source.shape
        assert changed_fraction(source, drawn) > 0.02  # boxes were drawn


def test_confidence_threshold_filters_detections(weights, images, tmp_path):
    run_demo(
        weights, "--input", str(images / "000000.jpg"), "--output", str(tmp_path), "--confidence-threshold", "0.99"
    )
    source, drawn = cv2.imread(str(images / "000000.jpg")), cv2.imread(str(tmp_path / "000000.jpg"))
    # Nothing scores 0.99: the image comes back undrawn.
    assert changed_fraction(source, drawn) < 0.002


def test_predictor_returns_boxes_in_input_coordinates(weights):
    cfg = LazyConfig.load(CONFIG)
    cfg.train.init_checkpoint, cfg.train.device = weights, "cpu"
    cfg.model.test_score_thresh = 0.0
    predictor = LazyPredictor(cfg)
    instances = predictor(np.zeros((90, 150, 3), dtype=np.uint8))
    assert instances.image_size == (90, 150) and len(instances) > 0
    assert predictor.metadata.thing_classes[0] == "ellipse"


@pytest.mark.parametrize("precision,bf16", [("bf16", True), ("fp32", False)])
def test_precision(weights, images, tmp_path, autocast_at_forward, precision, bf16):
    run_demo(weights, "--input", str(images / "000000.jpg"), "--output", str(tmp_path), "--precision", precision)
    assert autocast_at_forward == [bf16]


def test_video(weights, images, tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 96))
    assert writer.isOpened()
    for name in ["000000.jpg", "000001.jpg", "000002.jpg", "000000.jpg"]:
        writer.write(cv2.imread(str(images / name)))
    writer.release()

    [out] = run_demo(weights, "--video-input", video, "--output", str(tmp_path / "out"), "--confidence-threshold", "0")
    assert out == str(tmp_path / "out" / "clip.mp4")
    capture = cv2.VideoCapture(out)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (96, 96, 3)


def test_class_names_of_a_registered_coco_dataset(tmp_path):
    folder = get_shapes_dataset(num_images=2, seed=0, image_size=64, root=tmp_path)
    register_coco_datasets([("demo_shapes", str(folder / "annotations.json"), str(folder / "images"))])
    assert dataset_metadata("demo_shapes").thing_classes == [
        "ellipse",
        "rectangle",
        "triangle",
        "star",
        "ring",
        "cross",
    ]


def test_missing_weights_are_an_error():
    cfg = LazyConfig.load(CONFIG)
    with pytest.raises(ValueError, match="train.init_checkpoint"):
        LazyPredictor(cfg)
