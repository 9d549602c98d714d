"""Bad data: unusable images, malformed annotation files and degenerate or numerous boxes are handled as
documented or stopped with an error naming the file, the annotation and what to do."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

from tests.conftest import reregister_coco
from tood.data import get_shapes_dataset
from tood.data.checks import (
    CheckedDatasetMapper,
    DataError,
    check_annotations,
    get_checked_dataset_dicts,
)
from tood.data.loader import build_train_loader
from tood.engine.arguments import register_coco_datasets
from tood.losses import TOODLoss
from tood.priors import level_boxes, level_points

pytestmark = pytest.mark.usefixtures("one_thread")  # keeps these tests light next to other work


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A generated dataset folder: 2 images of 64 px, annotations.json."""
    return get_shapes_dataset(num_images=2, seed=0, image_size=64, root=tmp_path_factory.mktemp("shapes"))


def _mapper(on_bad_image="raise", is_train=True, augmentations=()):
    return CheckedDatasetMapper(
        is_train=is_train, augmentations=list(augmentations), image_format="RGB", on_bad_image=on_bad_image
    )


def _record(file_name, size=64, annotations=()):
    return {"file_name": str(file_name), "image_id": 1, "width": size, "height": size, "annotations": list(annotations)}


@pytest.fixture(scope="module")
def bad_images(shapes, tmp_path_factory):
    """name -> (record, words the error must contain) for each kind of unusable image."""
    root = tmp_path_factory.mktemp("bad_images")
    good = (shapes / "images" / "000000.jpg").read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"not an image at all")
    (root / "truncated.jpg").write_bytes(good[: len(good) * 2 // 3])
    return {
        "missing": (_record(root / "missing.jpg"), "does not exist"),
        "empty": (_record(root / "empty.jpg"), "not a readable image"),
        "unreadable": (_record(root / "text.jpg"), "not a readable image"),
        "truncated": (_record(root / "truncated.jpg"), "truncated"),
        "other size": (_record(shapes / "images" / "000000.jpg", size=100), "Mismatched image shape"),
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "unreadable", "truncated", "other size"])
def test_bad_image_raises_naming_the_file_or_is_skipped(bad_images, kind, tood_log):
    record, words = bad_images[kind]
    with pytest.raises(DataError) as e:
        _mapper("raise")(record)
    assert record["file_name"] in str(e.value) and words in str(e.value)
    assert "on_bad_image=skip" in str(e.value)

    assert _mapper("skip")(record) is None
    assert f"Skipped image {record['file_name']}" in tood_log.text


def test_training_loader_skips_bad_images_and_evaluation_refuses_to(shapes, bad_images, tood_log):
    good = [_record(shapes / "images" / f"00000{i}.jpg") for i in range(2)]
    dataset = [good[0], bad_images["missing"][0], good[1], bad_images["truncated"][0]]
    loader = build_train_loader(dataset, mapper=_mapper("skip"), total_batch_size=2, num_workers=0)
    batches = [batch for batch, _ in zip(loader, range(4))]
    names = {d["file_name"] for batch in batches for d in batch}
    assert names == {g["file_name"] for g in good}
    assert "Skipped image" in tood_log.text

    with pytest.raises(ValueError, match="evaluation must see every image"):
        _mapper("skip", is_train=False)
    # A wrong image folder is not "a few bad files": skipping gives up.
    mapper = _mapper("skip")
    with pytest.raises(DataError, match="were all unusable"):
        for _ in range(20):
            mapper(bad_images["missing"][0])


def _coco(annotations, images=None, categories=2):
    images = images or [{"id": 1, "file_name": "000000.jpg", "width": 64, "height": 64}]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(categories)],
    }


def _ann(ann_id, bbox, image_id=1, category_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"images": [{"id": 1, "file_name": "a.jpg", "wid', ["is not valid JSON", "truncated?"]),
        (_coco([])["images"], ["holds a JSON list"]),
        ({"images": [], "annotations": []}, ["has no 'categories' list"]),
        (_coco([_ann(5, [1, 1, 4, 4], category_id=9)]), ["annotation id 5", "category_id 9", "[1, 2]"]),
        (_coco([_ann(3, [1, 1, 4, 4]), _ann(3, [2, 2, 4, 4])]), ["annotation id 3 is used twice"]),
        (_coco([], images=[{"id": 1, "file_name": "a.jpg"}]), ["images[0] (id 1) has no valid width, height"]),
    ],
    ids=["truncated", "not an object", "no categories", "unknown category", "duplicate id", "image size"],
)
def test_bad_coco_json_names_the_file_and_annotation(shapes, tmp_path, content, words):
    json_file = tmp_path / "bad.json"
    json_file.write_text(content if isinstance(content, str) else json.dumps(content))
    reregister_coco("bad_json", json_file, shapes / "images")
    with pytest.raises(DataError) as e:
        DatasetCatalog.get("bad_json")
    message = str(e.value)
    assert str(json_file) in message and "bad_json" in message
    for word in words:
        assert word in message


def test_coco_registration_names_missing_files(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        register_coco_datasets([("x", str(tmp_path / "missing.json"), str(shapes / "images"))])
    with pytest.raises(NotADirectoryError, match="image folder .*nowhere does not exist"):
        register_coco_datasets([("x", str(shapes / "annotations.json"), str(tmp_path / "nowhere"))])


def test_malformed_box_names_file_and_annotation(shapes, tmp_path):
    # load_coco_json takes a 3-number bbox; the checks refuse it before the mapper would fail on it.
    json_file = tmp_path / "three.json"
    json_file.write_text(json.dumps(_coco([_ann(1, [1, 1, 4, 4]), _ann(8, [1, 2, 3])])))
    reregister_coco("three_numbers", json_file, shapes / "images")
    with pytest.raises(DataError, match=r"000000.jpg \(image id 1\), annotation id 8: bbox \[1, 2, 3\]"):
        get_checked_dataset_dicts("three_numbers")


def test_box_policy_drops_clips_and_counts(shapes, tmp_path, tood_log):
    images = [{"id": i, "file_name": f"00000{i % 2}.jpg", "width": 64, "height": 64} for i in (1, 2, 3)]
    annotations = [
        _ann(1, [10, 10, 20, 20]),
        _ann(2, [5, 5, 0, 10]),  # zero width
        _ann(3, [30, 30, -5, 10]),  # negative width
        _ann(4, [50, 50, 30, 30]),  # partly outside: clipped to [50, 50, 64, 64]
        _ann(5, [70, 70, 10, 10]),  # wholly outside
        _ann(6, [0, 0, 10, 10], iscrowd=1),
        _ann(7, [3, 3, 0, 0], image_id=3),  # image 3 is left without boxes; image 2 has none at all
    ]
    json_file = tmp_path / "policy.json"
    json_file.write_text(json.dumps(_coco(annotations, images=images)))
    reregister_coco("policy", json_file, shapes / "images")

    dicts = get_checked_dataset_dicts("policy", filter_empty=False)
    assert [d["image_id"] for d in dicts] == [1, 2, 3]
    kept = {a["id"]: a for a in dicts[0]["annotations"]}
    assert sorted(kept) == [1, 4, 6] and dicts[1]["annotations"] == dicts[2]["annotations"] == []
    assert kept[4]["bbox"] == [50.0, 50.0, 64.0, 64.0] and kept[4]["bbox_mode"] == BoxMode.XYXY_ABS
    log = tood_log.text
    assert "dropped 3 boxes of zero or negative size" in log and "annotation id 2" in log
    assert "dropped 1 boxes wholly outside their image" in log and "annotation id 5" in log
    assert "clipped 1 boxes to their image" in log and "annotation id 4" in log
    assert "1 crowd boxes (ignored in training), 2 images without boxes" in log

    # filter_empty keeps only images with a non-crowd box; the mapper ignores the crowd box.
    dicts = get_checked_dataset_dicts("policy", filter_empty=True)
    assert [d["image_id"] for d in dicts] == [1]
    instances = _mapper()(dicts[0])["instances"]
    assert instances.gt_boxes.tensor.tolist() == [[10, 10, 30, 30], [50, 50, 64, 64]]

    with pytest.raises(DataError, match=r"annotation id 1: category_id 7 is not one of the dataset's 6 classes"):
        check_annotations([_record("x.jpg", annotations=[dict(kept[1], category_id=7)])], num_classes=6)


def test_mapper_does_not_turn_a_negative_box_into_a_positive_one(shapes):
    # Detectron2's transforms take min/max of the corners: [30, 30, -5, 10] would come out as a 5 x 10 box.
    import detectron2.data.transforms as T

    box = {"bbox": [30, 30, -5, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "id": 3}
    record = _record(shapes / "images" / "000000.jpg", annotations=[box])
    mapped = _mapper(augmentations=[T.ResizeShortestEdge(96, 96)])(record)
    assert len(mapped["instances"]) == 0


def test_image_with_3000_boxes(shapes):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 56, (3000, 2))
    boxes = [{"bbox": [*p, *rng.uniform(2, 8, 2)], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1} for p in xy]
    record = _record(shapes / "images" / "000000.jpg", annotations=boxes)
    instances = _mapper()(record)["instances"]
    assert len(instances) == 3000

    # The criterion on every anchor of a 64 px image, the GTs in chunks of a 1 MB budget.
    strides = [8, 16, 32, 64, 128]
    points = [level_points((max(64 // s, 1),) * 2, s) for s in strides]
    num = [len(p) for p in points]
    criterion = TOODLoss(num_classes=6, memory_budget_mb=1)
    for warmup in (True, False):
        scores = torch.rand(1, sum(num), 6, requires_grad=True)
        pred = torch.cat([level_boxes(p, s, 2.0) for p, s in zip(points, strides)])[None].requires_grad_()
        losses = criterion(
            scores,
            pred,
            torch.cat([level_boxes(p, s) for p, s in zip(points, strides)]),
            torch.cat(points),
            num,
            torch.cat([torch.full((n,), float(s)) for n, s in zip(num, strides)]),
            [instances.gt_boxes.tensor],
            [instances.gt_classes],
            warmup=warmup,
        )
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values()), (warmup, losses)
        assert torch.isfinite(scores.grad).all() and torch.isfinite(pred.grad).all()
