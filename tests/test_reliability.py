"""When things go wrong: bad data, non-finite losses, interrupted checkpoints, resuming, wrong configs and weights,
and failing distributed workers are either handled as documented or stopped with an error that says what to do."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase, hooks
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage
from torch import nn

from tests.conftest import REPO_ROOT
from tood.checkpoint import TOODCheckpointer
from tood.data import get_shapes_dataset
from tood.data.checks import (
    CheckedDatasetMapper,
    DataError,
    DatasetNotRegisteredError,
    check_annotations,
    get_checked_dataset_dicts,
    register_checked_coco,
)
from tood.data.loader import build_train_loader
from tood.engine import launch
from tood.engine.config_checks import ConfigKeyError, check_dataset_names, check_override_keys
from tood.engine.train_loop import build_trainer, check_losses_finite
from tood.engine.training import argument_parser, do_train, register_coco_datasets
from tood.layers import align_boxes, sigmoid_geometric_mean
from tood.losses import TOODLoss, TOODTargets, focal_loss_prob, giou_loss, quality_focal_loss_prob
from tood.priors import level_boxes, level_points

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart_shapes.py")


@pytest.fixture(autouse=True)
def _one_thread():
    # Keeps these tests light next to other work on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tood_log(caplog):
    """caplog that also sees the "tood" and fvcore loggers (Detectron2's setup_logger stops their propagation)."""
    loggers = [logging.getLogger(name) for name in ("tood", "fvcore")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def _register(name, json_file, image_root):
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    MetadataCatalog.pop(name, None)
    register_checked_coco(name, str(json_file), str(image_root))


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


# --- data --------------------------------------------------------------------------------------------------


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
    _register("bad_json", json_file, shapes / "images")
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
    _register("three_numbers", json_file, shapes / "images")
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
    _register("policy", json_file, shapes / "images")

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


# --- configuration and weights -----------------------------------------------------------------------------


def test_unknown_override_key_suggests_close_matches():
    cfg = LazyConfig.load(QUICKSTART)
    with pytest.raises(ConfigKeyError) as e:
        check_override_keys(cfg, ["model.hed.num_classes=3"])
    assert "Unknown config key 'model.hed.num_classes': model has no 'hed'" in str(e.value)
    assert "Did you mean model.head.num_classes?" in str(e.value)
    with pytest.raises(ConfigKeyError, match="Did you mean train.max_iter?"):
        check_override_keys(cfg, ["train.max_iters=10"])
    # Arguments reached through **kwargs (CheckedDatasetMapper -> DatasetMapper) are known too.
    with pytest.raises(ConfigKeyError, match="Did you mean dataloader.train.mapper.on_bad_image?"):
        check_override_keys(cfg, ["dataloader.train.mapper.on_bad_imag=raise"])
    # Existing keys, list items, arguments left at their default, and keys added with "+".
    check_override_keys(
        cfg,
        [
            "train.max_iter=5",
            "dataloader.train.mapper.augmentations.0.short_edge_length=96",
            "dataloader.train.mapper.use_keypoint=False",
            "model.head.prior_prob=0.02",
            "+train.note=hello",
        ],
    )


def test_unregistered_dataset_lists_the_registered_ones():
    cfg = LazyConfig.load(QUICKSTART)
    cfg.dataloader.train.dataset.names = "tood_shapes_trian"
    with pytest.raises(DatasetNotRegisteredError) as e:
        check_dataset_names(cfg)
    message = str(e.value)
    assert "Dataset 'tood_shapes_trian' (dataloader.train.dataset.names) is not registered" in message
    assert "Did you mean 'tood_shapes_train'" in message and "--register-coco tood_shapes_trian" in message
    assert "Registered datasets: " in message and "tood_shapes_val" in message
    check_dataset_names(cfg, eval_only=True)  # evaluation reads the test set only


@pytest.fixture(scope="module")
def quickstart_model():
    def build(num_classes):
        cfg = LazyConfig.load(QUICKSTART)
        cfg.model.num_classes = num_classes
        return instantiate(cfg.model)

    return build


def test_checkpoint_of_other_classes_or_architecture_is_explained(quickstart_model, tmp_path, tood_log):
    TOODCheckpointer(quickstart_model(6), str(tmp_path)).save("six", iteration=9)
    path = str(tmp_path / "six.pth")
    model = quickstart_model(3)
    with pytest.raises(ValueError) as e:
        TOODCheckpointer(model, strict=True).load(path, checkpointables=[])
    message = str(e.value)
    assert f"Checkpoint {path} does not fit" in message
    assert "head.cls_score.weight: (6, 64, 3, 3) in the checkpoint, (3, 64, 3, 3) in the model" in message
    assert "predicts 6 classes" in message and "model.num_classes" in message
    # Resuming in a folder whose last checkpoint is of another model is refused too.
    with pytest.raises(ValueError, match="cls_score.bias: \\(6,\\) in the checkpoint"):
        TOODCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)

    # Initialising (fine-tuning to 3 classes): the rest is loaded, the classifier keeps its initialisation.
    before = model.head.cls_score.weight.detach().clone()
    TOODCheckpointer(model).resume_or_load(path, resume=False)
    assert torch.equal(model.head.cls_score.weight, before)
    saved = torch.load(path)["model"]
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, saved["backbone.bottom_up.stem.conv1.weight"])
    assert "keep their initialisation" in tood_log.text

    torch.save({"model": nn.Linear(3, 3).state_dict()}, tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="No tensor of .*linear.pth fits the model: it holds bias, weight"):
        TOODCheckpointer(model).resume_or_load(str(tmp_path / "linear.pth"), resume=False)


# --- checkpoints -------------------------------------------------------------------------------------------

KILLED_DURING_SAVE = """
import os, signal, sys
import torch
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer
from tood.checkpoint import TOODCheckpointer

folder, kind = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Linear(64, 64)
checkpointer = (TOODCheckpointer if kind == "atomic" else DetectionCheckpointer)(model, folder)
checkpointer.save("model_final", iteration=1)

def save_and_die(obj, f):  # the process is killed half-way through writing the next checkpoint
    f.write(b"PK" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_and_die
with torch.no_grad():
    model.weight.add_(1)
checkpointer.save("model_final", iteration=2)
"""


@pytest.mark.parametrize("kind", ["atomic", "detectron2"])
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, kind):
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, str(tmp_path), kind], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "detectron2":
        # fvcore writes in place: the kill leaves a broken file where the good checkpoint was.
        with pytest.raises(Exception):  # noqa: B017  (whatever torch.load makes of the garbage)
            torch.load(tmp_path / "model_final.pth")
        return
    checkpointer = TOODCheckpointer(nn.Linear(64, 64), str(tmp_path))
    assert checkpointer.last_iteration() == 1
    checkpointer.resume_or_load("", resume=True)
    for k, v in checkpointer.model.state_dict().items():
        assert torch.equal(v, expected[k])
    partial = [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith(".model_final.pth.")
    checkpointer.save("model_0000003", iteration=3)  # the next save clears what the kill left
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth", "model_final.pth"]


def test_weights_with_nan_are_not_saved(tmp_path):
    model = nn.Linear(2, 2)
    checkpointer = TOODCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights hold NaN or inf \(bias\).*model_0000001.pth"):
        checkpointer.save("model_0000002", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


# --- training runs -----------------------------------------------------------------------------------------

TINY_CONFIG = """
from detectron2.config import LazyConfig

_base = LazyConfig.load({base!r})
model, optimizer, lr_multiplier, dataloader, train = (
    _base.model, _base.optimizer, _base.lr_multiplier, _base.dataloader, _base.train
)
dataloader.train.dataset.names = "reliability_train"
for _augs in (dataloader.train.mapper.augmentations, dataloader.test.mapper.augmentations):
    _augs[0].short_edge_length = 128
    _augs[0].max_size = 128
dataloader.train.mapper.augmentations[1].prob = 0.0
dataloader.train.total_batch_size = 2
del dataloader.evaluator
train.max_iter = 6
train.log_period = 1
train.eval_period = 0
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A config of the quick-start model on 8 generated images of 128 px, 2 per batch, no evaluation."""
    root = tmp_path_factory.mktemp("tiny")
    folder = get_shapes_dataset(num_images=8, seed=0, image_size=128, root=root)
    _register("reliability_train", folder / "annotations.json", folder / "images")
    config = root / "tiny_config.py"
    config.write_text(TINY_CONFIG.format(base=QUICKSTART))
    return str(config)


class RecordSteps(HookBase):
    """Each iteration's raw losses and learning rate."""

    def __init__(self):
        self.losses, self.lrs = {}, {}

    def after_step(self):
        storage = self.trainer.storage
        self.losses[self.trainer.iter] = {k: storage.history(k).latest() for k in ("loss_cls", "loss_box_reg")}
        self.lrs[self.trainer.iter] = storage.history("lr").latest()


def _train(config, output_dir, *overrides, resume=False):
    args = argument_parser().parse_args(["--config-file", config] + (["--resume"] if resume else []))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), [f"train.output_dir={output_dir}", *overrides])
    seed_all_rng(0)
    record = RecordSteps()
    do_train(args, cfg, extra_hooks=[record])
    return record


@pytest.mark.slow
def test_nan_loss_stops_with_iteration_losses_and_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    forward = TOODLoss.forward

    def nan_at_iteration_4(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        if get_event_storage().iter == 4:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(TOODLoss, "forward", nan_at_iteration_4)
    with pytest.raises(FloatingPointError) as e:
        _train(tiny_config, tmp_path, "train.checkpointer.period=3")
    message, last = str(e.value), str(tmp_path / "model_0000002.pth")
    assert "Loss is NaN or infinite at iteration 4 (loss_cls=nan, loss_box_reg=" in message
    assert f"The last good checkpoint is {last}: continue from it with --resume" in message
    assert (
        not (tmp_path / "model_final.pth").exists()
        and (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    )

    monkeypatch.setattr(TOODLoss, "forward", forward)
    resumed = _train(tiny_config, tmp_path, "train.checkpointer.period=3", resume=True)
    assert sorted(resumed.losses) == [3, 4, 5]
    assert all(math.isfinite(v) for step in resumed.losses.values() for v in step.values())
    final = torch.load(tmp_path / "model_final.pth")
    assert final["iteration"] == 5 and all(torch.isfinite(v).all() for v in final["model"].values())


@pytest.mark.slow
def test_resumed_run_continues_like_the_uninterrupted_one(tiny_config, tmp_path, tood_log):
    """Resumed from iteration 0's checkpoint (as after a kill): the same data, losses, learning rates, warm-up
    phase (ATSS for iterations 0-1, then TAL) and final weights as the run that was never stopped."""
    full = _train(tiny_config, tmp_path / "full", "train.checkpointer.period=1")
    (tmp_path / "resumed").mkdir()
    os.link(tmp_path / "full" / "model_0000000.pth", tmp_path / "resumed" / "model_0000000.pth")
    (tmp_path / "resumed" / "last_checkpoint").write_text("model_0000000.pth")
    tood_log.clear()
    resumed = _train(tiny_config, tmp_path / "resumed", "train.checkpointer.period=1", resume=True)

    assert sorted(resumed.losses) == [1, 2, 3, 4, 5]
    for i in range(1, 6):
        assert resumed.lrs[i] == full.lrs[i]
        for k, v in resumed.losses[i].items():
            assert v == pytest.approx(full.losses[i][k], rel=1e-5, abs=1e-7), (i, k)
    assert "Iteration 1: ATSS warm-up until iteration 2" in tood_log.text
    assert "Iteration 2: task-aligned assignment" in tood_log.text
    weights = [torch.load(tmp_path / run / "model_final.pth")["model"] for run in ("full", "resumed")]
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x):
        return {"loss": (self.linear(x).float() - 1).pow(2).mean()}


def test_absurd_learning_rate_stops_at_the_first_nonfinite_loss():
    """A toy regression with lr 1e25 (float32 and bfloat16 autocast): the step that overflows is never taken."""
    for amp in (False, True):
        model = _Regression()
        trainer = build_trainer(
            model, [torch.ones(4, 8)] * 10, torch.optim.SGD(model.parameters(), lr=1e25), amp=amp, device="cpu"
        )
        with pytest.raises(FloatingPointError, match=r"Loss is NaN or infinite at iteration [1-9] \(loss=") as e:
            trainer.train(0, 10)
        assert "No checkpoint was written yet" in str(e.value)


def test_nan_in_the_last_iteration_writes_no_final_checkpoint(tmp_path):
    """A run that fails in its last iteration did not finish: no model_final, last_checkpoint stays on a good one."""
    model = _Regression()
    data = [torch.ones(4, 8)] * 3 + [torch.full((4, 8), float("nan"))]
    trainer = build_trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.checkpointer = TOODCheckpointer(model, str(tmp_path))
    trainer.register_hooks([hooks.PeriodicCheckpointer(trainer.checkpointer, period=2, max_iter=4)])
    with pytest.raises(FloatingPointError, match=f"iteration 3 .*{tmp_path / 'model_0000001.pth'}"):
        trainer.train(0, 4)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_own_numerics_stay_finite_at_extremes():
    """Random weights and an extreme learning rate give extreme logits, offsets and boxes, and batches without
    objects: the probability product, offset sampling, GIoU, losses and normalisers stay finite (also bfloat16)."""
    big = [-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("inf"), float("-inf")]
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.tensor(big, dtype=dtype).repeat_interleave(len(big)).requires_grad_()
        b = torch.tensor(big, dtype=dtype).repeat(len(big)).requires_grad_()
        p = sigmoid_geometric_mean(a, b)
        p.sum().backward()
        assert ((p >= 0) & (p <= 1)).all() and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()

    boxes = torch.randn(2, 4, 5, 6, requires_grad=True)
    for value in (1e3, 1e9, 1e30, -1e30):
        offsets = torch.full((2, 8, 5, 6), value, requires_grad=True)
        out = align_boxes(boxes, offsets)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(offsets.grad).all() and torch.isfinite(boxes.grad).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(align_boxes(boxes, offsets.detach().bfloat16())).all()

    # Degenerate, crossed, disjoint and huge (1e15 strides) predictions against degenerate and normal targets.
    pred = torch.tensor(
        [[0, 0, 0, 0], [5, 5, 1, 1], [3, 3, 3, 3], [100, 100, 200, 200], [-1e15, -1e15, 1e15, 1e15], [0, 0, 2, 2]],
        dtype=torch.float32,
        requires_grad=True,
    )
    target = torch.tensor([[0, 0, 0, 0], [0, 0, 2, 2], [3, 3, 3, 3], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    loss = giou_loss(pred, target.float())
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()

    # Probabilities of exactly 0 and 1 in both classification losses.
    probs = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 3])
    total = focal_loss_prob(probs, labels).sum() + quality_focal_loss_prob(probs, labels, torch.tensor([0.3, 0])).sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(probs.grad).all()

    # A batch without objects: normalisers clamp to 1, losses and gradients are finite, in both phases.
    criterion = TOODLoss(num_classes=3)
    points = level_points((4, 4), 8)
    for warmup in (True, False):
        scores = torch.rand(2, 16, 3, requires_grad=True)
        pred = level_boxes(points, 8, 1.0)[None].repeat(2, 1, 1).requires_grad_()
        empty = [torch.zeros(0, 4)] * 2
        args = (scores, pred, level_boxes(points, 8), points, [16], torch.full((16,), 8.0), empty)
        losses = criterion(*args, [torch.zeros(0, dtype=torch.long)] * 2, warmup=warmup)
        sum(losses.values()).backward()
        assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_cls"]) and torch.isfinite(scores.grad).all()
    norms = criterion.normalizers(TOODTargets(*[torch.zeros(2, 16)] * 5))
    assert [n.item() for n in norms] == [1.0, 1.0]


def test_giou_of_boxes_beyond_float32_area_range():
    pred = torch.tensor([[-1e20, -1e20, 1e20, 1e20]])
    assert torch.isfinite(giou_loss(pred, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))).all()


def test_decoded_boxes_stay_finite_for_large_regression_outputs():
    from detectron2.layers import ShapeSpec

    from tood.head import TOODHead

    head = TOODHead(input_shape=[ShapeSpec(channels=32)], num_classes=2, feat_channels=32, stacked_convs=1, strides=[8])
    boxes = head._decode_boxes(torch.full((1, 4, 2, 2), 100.0), head.scales[0], 8)
    assert torch.isfinite(boxes).all()


# --- two processes -----------------------------------------------------------------------------------------


def _failing_worker(kind):
    if comm.get_rank() == 1:
        if kind == "raise":
            raise RuntimeError("worker 1 failed on purpose")
        if kind == "die":
            os._exit(3)
        time.sleep(120)  # "hang": alive but never reaching the collective
    comm.synchronize()


@pytest.mark.slow
@pytest.mark.parametrize("kind, words", [("raise", "worker 1 failed on purpose"), ("die", "exit code 3"), ("hang", "")])
def test_failing_worker_ends_the_run(kind, words):
    start = time.perf_counter()
    with pytest.raises(Exception) as e:  # noqa: B017  (torch.multiprocessing's ProcessRaised/ExitedException)
        launch(_failing_worker, 2, dist_url="auto", args=(kind,), timeout=timedelta(seconds=5))
    assert time.perf_counter() - start < 60
    message = str(e.value)
    assert words in message
    if kind == "hang":  # rank 0 gave up waiting at the process group's timeout
        assert "Process 0 terminated" in message and ("timed out" in message.lower() or "timeout" in message.lower())


def test_a_finished_worker_tears_its_process_group_down():
    # One gloo process, in this one: once the main function returns, nothing of the group is left for interpreter
    # exit to tear down (there, gloo's teardown could race another process's).
    from detectron2.engine.launch import _find_free_port

    from tood.compat import _cpu_worker

    seen = []
    threads, local_group = torch.get_num_threads(), comm._LOCAL_PROCESS_GROUP
    try:
        url = f"tcp://127.0.0.1:{_find_free_port()}"
        _cpu_worker(0, lambda: seen.append(comm.get_world_size()), 1, 1, 0, url, (), timedelta(seconds=30))
    finally:
        torch.set_num_threads(threads)
        comm._LOCAL_PROCESS_GROUP = local_group
    assert seen == [1]
    assert not torch.distributed.is_initialized()


def _normalizer_worker(out_dir):
    rank = comm.get_rank()
    # Rank 0: classification targets summing to 3, box weights to 2; rank 1: 7 and 6.
    cls_sum, box_sum = (3.0, 2.0) if rank == 0 else (7.0, 6.0)
    zeros = torch.zeros(1, 4)
    targets = TOODTargets(zeros.long(), torch.zeros(1, 4, 4), zeros + cls_sum / 4, zeros + box_sum / 4, zeros + 1)
    result = {"norms": [n.item() for n in TOODLoss(num_classes=2).normalizers(targets)]}
    losses = {"loss_cls": torch.tensor(float("nan") if rank == 1 else 0.5), "loss_box_reg": torch.tensor(0.25)}
    try:
        check_losses_finite(losses, 7)
    except FloatingPointError as e:
        result["error"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_average_normalizers_and_stop_together_on_nan(tmp_path):
    launch(_normalizer_worker, 2, dist_url="auto", args=(str(tmp_path),), timeout=timedelta(seconds=30))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        # The mean of the ranks' sums: (3 + 7) / 2 and (2 + 6) / 2.
        assert result["norms"] == [5.0, 4.0]
        # Rank 0's losses are finite, yet it stops too (rather than wait for rank 1 in the next collective).
        assert "at iteration 7 (rank 0: loss_cls=0.5, loss_box_reg=0.25; rank 1: loss_cls=nan" in result["error"]
