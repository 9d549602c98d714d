"""The generated shapes dataset: determinism, label validity, statistics, registration and the cache."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

import tood.data
from tood.data import synthetic
from tood.data.synthetic import ShapesConfig, dataset_dir_name, generate_dataset, get_shapes_dataset

TINY = "tood_shapes_test_tiny"
# One object per image on a flat background, nothing else drawn over it: its drawn pixels are readable back.
PLAIN = ShapesConfig(
    objects_per_image=(1, 1),
    empty_prob=0.0,
    crowded_prob=0.0,
    backgrounds=("flat",),
    distractor_strokes=(0, 0),
    distractor_patches=(0, 0),
    shading=0.0,
    noise_std=0.0,
    blur_prob=0.0,
    image_format="png",
)


def _pixels(folder: Path, coco: dict) -> list:
    return [np.asarray(Image.open(folder / "images" / im["file_name"])) for im in coco["images"]]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """48 images of the default config: the folder and its COCO json."""
    folder = tmp_path_factory.mktemp("sample")
    return folder, generate_dataset(folder, 48, seed=0)


@pytest.fixture
def tiny_name():
    yield TINY
    DatasetCatalog.pop(TINY, None)
    MetadataCatalog.pop(TINY, None)


@pytest.fixture
def generations(monkeypatch):
    """Counts the datasets that get generated."""
    calls = []
    real = synthetic.generate_dataset

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_dataset", counting)
    return calls


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    generate_dataset(tmp_path / "a", 6, seed=3)
    generate_dataset(tmp_path / "b", 6, seed=3)
    generate_dataset(tmp_path / "c", 6, seed=4)
    assert (tmp_path / "a/annotations.json").read_bytes() == (tmp_path / "b/annotations.json").read_bytes()
    names = sorted(p.name for p in (tmp_path / "a/images").iterdir())
    assert len(names) == 6
    for name in names:
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()
    a = json.loads((tmp_path / "a/annotations.json").read_text())
    c = json.loads((tmp_path / "c/annotations.json").read_text())
    assert a["annotations"] != c["annotations"]
    assert not np.array_equal(_pixels(tmp_path / "a", a)[0], _pixels(tmp_path / "c", c)[0])


def test_smaller_dataset_is_a_prefix(tmp_path):
    small = generate_dataset(tmp_path / "small", 3, seed=5)
    large = generate_dataset(tmp_path / "large", 6, seed=5)
    assert large["images"][:3] == small["images"]
    assert large["annotations"][: len(small["annotations"])] == small["annotations"]
    for a, b in zip(_pixels(tmp_path / "small", small), _pixels(tmp_path / "large", large)):
        np.testing.assert_array_equal(a, b)


def test_annotations_are_valid_coco(sample):
    folder, coco = sample
    api = COCO(str(folder / "annotations.json"))
    assert len(api.getImgIds()) == 48
    category_ids = {c["id"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= image["width"] and y + h <= image["height"]
        assert ann["category_id"] in category_ids
        assert ann["iscrowd"] == 0 and ann["area"] == w * h
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for im in coco["images"]:
        assert Image.open(folder / "images" / im["file_name"]).size == (320, 320)


def test_default_statistics(sample):
    _, coco = sample
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=49)[1:]
    assert (per_image == 0).any(), "some images must have no objects"
    assert per_image.max() >= 20, "some images must be crowded"
    assert len({a["category_id"] for a in coco["annotations"]}) >= 5
    longest = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert longest.min() <= 16 and 120 <= longest.max() <= 160


def test_boxes_are_tight_to_drawn_pixels(tmp_path):
    coco = generate_dataset(tmp_path, 12, seed=0, config=PLAIN)
    assert len(coco["annotations"]) == 12
    for pixels, ann in zip(_pixels(tmp_path, coco), coco["annotations"]):
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        drawn = (pixels != colours[counts.argmax()]).any(axis=2)  # not the background colour
        ys, xs = np.nonzero(drawn)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_objects_keep_enough_visible():
    # Object 1 is a 10x10 square; covering more than max_occlusion (0.7) of it is refused.
    canvas = synthetic._Canvas(np.zeros((20, 20, 3), np.float32), keep=0.3, capacity=2)
    square = np.ones((10, 10), bool)
    canvas.count, canvas.full[1] = 1, 100
    canvas.paint(slice(0, 10), slice(0, 10), square, np.ones((10, 10, 3), np.float32), 1)
    cover = np.zeros((10, 10), bool)
    cover[:6] = True
    assert not canvas.hides_too_much(slice(0, 10), slice(0, 10), cover)
    cover[:8] = True
    assert canvas.hides_too_much(slice(0, 10), slice(0, 10), cover)
    assert not canvas.hides_too_much(slice(10, 20), slice(0, 10), cover)  # elsewhere: hides nothing


def test_registration(tmp_path, monkeypatch, tiny_name):
    monkeypatch.setenv("TOOD_DATASETS", str(tmp_path))
    assert {"tood_shapes_train", "tood_shapes_val", "tood_shapes_tune"} <= set(DatasetCatalog.list())
    # The tuning split is drawn apart from the others: no image in common.
    assert len({seed for _, seed in tood.data.DEFAULT_SPLITS.values()}) == len(tood.data.DEFAULT_SPLITS)
    meta = MetadataCatalog.get("tood_shapes_val")
    assert meta.thing_classes == list(synthetic.CLASSES) and meta.evaluator_type == "coco"
    tood.data.register_all()  # again: replaces, does not raise

    folder = tood.data.register_shapes_dataset(tiny_name, 8, seed=0)
    assert folder.parent == tmp_path and not folder.exists(), "registration must not generate"
    dicts = DatasetCatalog.get(tiny_name)
    assert len(dicts) == 8
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (320, 320)
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and len(ann["bbox"]) == 4
            assert 0 <= ann["category_id"] < len(synthetic.CLASSES) and ann["iscrowd"] == 0
    assert sum(len(d["annotations"]) for d in dicts) > 0
    meta = MetadataCatalog.get(tiny_name)
    assert meta.thing_classes == list(synthetic.CLASSES) and meta.evaluator_type == "coco"
    assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)

    tood.data.register_shapes_dataset(tiny_name, 8, seed=0)
    assert len(DatasetCatalog.get(tiny_name)) == 8


def test_second_get_reuses_the_cache(tmp_path, monkeypatch, tiny_name, generations):
    monkeypatch.setenv("TOOD_DATASETS", str(tmp_path))
    folder = tood.data.register_shapes_dataset(tiny_name, 4, seed=0)
    DatasetCatalog.get(tiny_name)
    mtime = (folder / "annotations.json").stat().st_mtime_ns
    DatasetCatalog.get(tiny_name)
    assert len(generations) == 1 and (folder / "annotations.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [folder.name], "no temporary folder is left"

    other = ShapesConfig(crowded_prob=0.5)
    assert dataset_dir_name(4, 0, config=other) != folder.name != dataset_dir_name(4, 1)
    assert get_shapes_dataset(4, 0, config=other) != folder and len(generations) == 2


def test_stale_temporary_folder_is_ignored(tmp_path, generations):
    name = dataset_dir_name(3, 0)
    stale = tmp_path / f".{name}.tmp-killed"
    (stale / "images").mkdir(parents=True)
    (stale / "images/000000.jpg").write_bytes(b"half")
    folder = get_shapes_dataset(3, 0, root=tmp_path)
    assert folder == tmp_path / name and len(generations) == 1
    assert len(json.loads((folder / "annotations.json").read_text())["images"]) == 3
    assert len(list((folder / "images").iterdir())) == 3


def test_incomplete_dataset_folder_is_refused(tmp_path):
    (tmp_path / dataset_dir_name(3, 0) / "images").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="annotations.json"):
        get_shapes_dataset(3, 0, root=tmp_path)


def test_losing_a_generation_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its complete copy into place while this one generates: this one yields."""
    real = synthetic.generate_dataset
    final = tmp_path / dataset_dir_name(3, 0)

    def racing(out_dir, *args, **kwargs):
        real(final, *args, **kwargs)  # the other process, finishing first
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_dataset", racing)
    assert get_shapes_dataset(3, 0, root=tmp_path) == final
    winner_mtime = (final / "annotations.json").stat().st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == [final.name], "the loser's copy is removed"
    assert get_shapes_dataset(3, 0, root=tmp_path) == final
    assert (final / "annotations.json").stat().st_mtime_ns == winner_mtime


def test_command_line(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "cli"), "--num-images", "2", "--seed", "1"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert len(json.loads((tmp_path / "cli/annotations.json").read_text())["images"]) == 2
