"""The zoo's epoch-counted schedule under a user's overrides, and the checks before a run starts.

Any ``train.max_iter`` trains (LR steps, the ATSS -> TAL switch and periods past it are not reached, and setup says
so); the epoch length of a user's dataset is counted from its annotation file; an override that makes no sense is an
error naming the key; missing data and weights are all named at once, before anything is built, without a
traceback from tools/train_net.py.
"""

import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.solver import LRMultiplier

from tests.conftest import ORACLE_DIR, REPO_ROOT, _load_oracle, register_coco_args
from tood.data import get_shapes_dataset
from tood.data.checks import get_checked_dataset_dicts
from tood.engine import argument_parser, main
from tood.engine.config_checks import ConfigValueError, PreflightError, check_schedule
from tood.engine.training import load_config
from tood.solver import WarmupMultiStepSchedule

R50_1X = str(REPO_ROOT / "configs" / "tood_R_50_1x.py")
SIZE = 64


def lrs(schedule: WarmupMultiStepSchedule, max_iter: int, base_lr: float = 1.0):
    """The learning rate of every iteration, as Detectron2's LRScheduler hook sets it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = LRMultiplier(optimizer, schedule, max_iter)
    values = []
    for _ in range(max_iter):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


ZOO_SCHEDULES = {"1x": "tood_R_50_1x.py", "2x": "tood_R_50_2x_ms.py"}
MMENGINE_RTOL = 1e-12


def mmengine_cases():
    """The cases of mmengine's own learning-rate tables, each run in full and cut short (``max_iter``: None or N)."""
    path = ORACLE_DIR / "mmengine_lr_tables.pt"
    if not path.is_file():  # collected without the reference folder: the test itself skips or fails (conftest)
        return [pytest.param(None, None, id="mmengine_lr_tables.pt")]
    cases = torch.load(path, weights_only=True)["cases"]
    params = []
    for i, case in enumerate(cases):
        name = f"{case['schedule']}-E{case['iters_per_epoch']}"
        # Cut inside the warm-up, just past the first LR step, or after 1000 iterations, whichever comes first.
        cut = min(case["total_iters"] - 1, 300, 8 * case["iters_per_epoch"] + 1 if case["schedule"] == "1x" else 1000)
        params += [pytest.param(i, None, id=name), pytest.param(i, max(cut, 1), id=f"{name}-cut{max(cut, 1)}")]
    return params


@functools.cache
def zoo_config(schedule):
    return LazyConfig.load(str(REPO_ROOT / "configs" / ZOO_SCHEDULES[schedule]))


@pytest.mark.parametrize("case,max_iter", mmengine_cases())
def test_the_zoo_schedules_give_mmengine_s_rates(case, max_iter):
    """The learning rate of every tabulated iteration, as mmengine 0.10.7 steps mmdetection 3.3's TOOD 1x and 2x
    schedules (LinearLR warm-up + MultiStepLR converted to iterations) for epochs of 1 to 7330 iterations, against
    the zoo config's schedule as a run builds it: ``train.iters_per_epoch`` (and, for a run cut short,
    ``train.max_iter``) set, ``lr_multiplier`` instantiated and stepped by Detectron2's ``LRMultiplier``."""
    table = _load_oracle("mmengine_lr_tables.pt")["cases"][case]
    cfg = copy.deepcopy(zoo_config(table["schedule"]))
    overrides = [f"train.iters_per_epoch={table['iters_per_epoch']}"]
    if max_iter is not None:
        overrides.append(f"train.max_iter={max_iter}")
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    assert cfg.train.max_iter == (max_iter or table["total_iters"])
    assert cfg.optimizer.lr == table["base_lr"]
    wanted = {i: lr for i, lr in zip(table["iters"], table["lr"]) if i < cfg.train.max_iter}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    scheduler = LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)
    got = {}
    for i in wanted:  # the rate LRMultiplier sets at iteration i (stepping there one by one takes minutes at E=7330)
        scheduler.last_epoch = i
        got[i] = scheduler.get_lr()[0]
    worst = max(abs(got[i] - lr) / lr for i, lr in wanted.items())
    assert worst <= MMENGINE_RTOL, [
        (i, got[i], lr) for i, lr in wanted.items() if abs(got[i] - lr) > MMENGINE_RTOL * lr
    ]


@pytest.mark.parametrize(
    "milestones,warmup",
    [([0, 5], 10), ([8, 8], 10), ([11, 8], 10), ([5], 0)],
    ids=["zero", "repeated", "unordered", "no-warmup"],
)
def test_a_schedule_that_makes_no_sense_is_refused(milestones, warmup):
    with pytest.raises(ValueError):
        WarmupMultiStepSchedule(20, milestones, warmup_iters=warmup)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A user's COCO-format dataset: 6 generated images, plus a corrupt image, a missing one, an image whose boxes
    are all degenerate and an image with 3,000 boxes."""
    source = get_shapes_dataset(num_images=6, seed=5, image_size=SIZE, root=tmp_path_factory.mktemp("gen"))
    folder = tmp_path_factory.mktemp("user_data")
    shutil.copytree(source / "images", folder / "images")
    coco = json.loads((source / "annotations.json").read_text())
    images, annotations = coco["images"], coco["annotations"]
    next_image, next_ann = max(i["id"] for i in images) + 1, max(a["id"] for a in annotations) + 1

    def add_image(file_name, boxes):
        nonlocal next_image, next_ann
        images.append({"id": next_image, "file_name": file_name, "width": SIZE, "height": SIZE})
        for box in boxes:
            annotations.append(
                {"id": next_ann, "image_id": next_image, "bbox": box, "category_id": 1, "area": 1.0, "iscrowd": 0}
            )
            next_ann += 1
        next_image += 1

    (folder / "images" / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    add_image("corrupt.jpg", [[4, 4, 20, 20]])
    add_image("missing.jpg", [[4, 4, 20, 20]])
    shutil.copy(folder / "images" / images[0]["file_name"], folder / "images" / "degenerate.jpg")
    add_image("degenerate.jpg", [[10, 10, 0, 5], [3, 3, 6, 0]])
    shutil.copy(folder / "images" / images[1]["file_name"], folder / "images" / "crowded.jpg")
    g = torch.Generator().manual_seed(0)
    xy, wh = torch.rand(3000, 2, generator=g) * 48, 2 + torch.rand(3000, 2, generator=g) * 14
    add_image("crowded.jpg", torch.cat([xy, wh], 1).tolist())
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder, source


def user_args(data, output, *overrides):
    """The README's custom-data command on configs/tood_R_50_1x.py, with small images; evaluated on the clean
    images (evaluation refuses a corrupt image, naming it)."""
    train, val = data
    return argument_parser().parse_args(
        [
            "--config-file",
            R50_1X,
            *register_coco_args(train, "mine"),
            *register_coco_args(val, "mine_val"),
            "dataloader.train.dataset.names=mine",
            "dataloader.test.dataset.names=mine_val",
            "model.num_classes=6",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            'train.init_checkpoint=""',
            "train.eval_period=0",
            f"train.output_dir={output}",
            f"dataloader.train.mapper.augmentations.0.short_edge_length=[{SIZE}]",
            f"dataloader.train.mapper.augmentations.0.max_size={SIZE}",
            f"dataloader.test.mapper.augmentations.0.short_edge_length={SIZE}",
            f"dataloader.test.mapper.augmentations.0.max_size={SIZE}",
            "train.log_period=1",
            *overrides,
        ]
    )


@pytest.mark.slow
def test_max_iter_2_on_the_zoo_config_trains_and_writes_its_checkpoint(user_data, tmp_path, caplog):
    """Two iterations of the R-50 1x config on the user's data: the LR steps (epochs 8 and 11 of this dataset) and
    the ATSS -> TAL switch lie past the end and are said to; the bad images are skipped, the degenerate boxes
    dropped, the crowded image trained on."""
    output = tmp_path / "run"
    args = user_args(user_data, output, "train.max_iter=2")
    cfg, notes = load_config(args)
    # Counted from the annotation file, as many as the loaded dataset's images with a usable box.
    num_images = len(get_checked_dataset_dicts("mine", filter_empty=True))
    epoch = math.ceil(num_images / 2)
    assert cfg.train.iters_per_epoch == epoch
    text = "\n".join(notes)
    assert f"ceil({num_images} images / batch 2) = {epoch} iterations" in text
    assert f"The LR step at iteration {8 * epoch}, epoch 8 lies past train.max_iter=2: not reached." in text
    assert f"The LR step at iteration {11 * epoch}, epoch 11 lies past train.max_iter=2" in text
    assert f"task-aligned assignment at iteration {4 * epoch}, epoch 4 lies past train.max_iter=2" in text
    assert "The run ends within the 500-iteration LR warm-up" in text

    main(args)
    assert (output / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == [0, 1]
    saved = LazyConfig.load(str(output / "config.yaml"))
    assert saved.train.iters_per_epoch == epoch  # the epoch length goes with the run


@pytest.mark.slow
def test_max_iter_between_the_milestones_reaches_the_first_step_only(user_data, tmp_path):
    """One iteration per epoch: the LR steps at iterations 8 and 11; a run of 10 takes the first, not the second
    (the rates read back from the run's metrics)."""
    output = tmp_path / "run"
    args = user_args(
        user_data,
        output,
        "train.max_iter=10",
        "train.iters_per_epoch=1",
        "lr_multiplier.warmup_iters=2",
        "optimizer.lr=0.001",
        "train.checkpointer.period=100",
    )
    main(args)
    metrics = map(json.loads, (output / "metrics.json").read_text().splitlines())
    lr = {m["iteration"]: m["lr"] for m in metrics if "lr" in m}
    assert sorted(lr) == list(range(10))
    assert lr[7] == pytest.approx(0.001) and lr[8] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_iter=0", "train.max_iter=0"),
        ("train.max_iter=-5", "train.max_iter=-5"),
        ("train.iters_per_epoch=0", "train.iters_per_epoch=0"),
        ("dataloader.train.total_batch_size=0", "dataloader.train.total_batch_size=0"),
        ("lr_multiplier.milestones=[11,8]", "lr_multiplier.milestones=[11, 8]"),
        ("model.tal_start_iter=-1", "model.tal_start_iter=-1"),
    ],
)
def test_an_override_that_makes_no_sense_names_the_key(user_data, tmp_path, override, key):
    with pytest.raises(ConfigValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(user_args(user_data, tmp_path, override))


def test_milestones_and_batch_can_be_overridden(user_data, tmp_path):
    cfg, _ = load_config(user_args(user_data, tmp_path, "lr_multiplier.milestones=[3,7]", "train.max_iter=9"))
    assert list(instantiate(cfg.lr_multiplier).milestones) == [3, 7]
    assert not any("LR step" in note for note in check_schedule(cfg))
    num_images = len(get_checked_dataset_dicts("mine", filter_empty=True))
    cfg, _ = load_config(user_args(user_data, tmp_path, "dataloader.train.total_batch_size=5"))
    epoch = math.ceil(num_images / 5)
    assert (cfg.train.iters_per_epoch, cfg.train.max_iter, cfg.model.tal_start_iter) == (epoch, 12 * epoch, 4 * epoch)


def test_reference_batch_size_scales_the_learning_rate(user_data, tmp_path):
    cfg, notes = load_config(user_args(user_data, tmp_path, "train.reference_batch_size=16"))
    assert cfg.optimizer.lr == pytest.approx(0.01 * 2 / 16)
    assert "optimizer.lr 0.01 is for a total batch of 16: scaled to 0.00125 for batch 2." in notes
    cfg, _ = load_config(user_args(user_data, tmp_path))
    assert cfg.optimizer.lr == 0.01  # opt-in


def test_missing_coco_and_weights_are_named_together(tmp_path, monkeypatch):
    """Without COCO in place, the zoo config's checks name the missing annotation file and image folder, the ways
    forward, and the missing weights file: all in one error, before any model or dataset is built."""
    args = argument_parser().parse_args(["--config-file", R50_1X, f"train.output_dir={tmp_path}"])
    with pytest.raises(PreflightError) as e:
        load_config(args)
    message = str(e.value)
    json_file = os.path.join(
        os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco/annotations/instances_train2017.json"
    )
    assert f"Dataset 'coco_2017_train' needs the annotation file {json_file}" in message
    assert "DETECTRON2_DATASETS" in message and "--register-coco" in message
    assert "train.init_checkpoint=pretrained/resnet50_torchvision.pkl does not exist" in message
    assert "convert_torchvision_resnet.py" in message


@pytest.mark.slow
def test_the_headline_command_without_coco_ends_with_reasons_not_a_traceback(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "nothing_here"))
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "configs/tood_R_50_1x.py", "train.max_iter=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path}/nothing_here/coco/annotations/instances_train2017.json" in proc.stderr
    assert "train.init_checkpoint=pretrained/resnet50_torchvision.pkl does not exist" in proc.stderr
