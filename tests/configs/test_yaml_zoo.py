"""The YAML model zoo (configs/COCO-Detection/): each file is the twin of a LazyConfig of configs/ (same modules,
tensors, settings, outputs, schedule, input sizes and solver), and tools/train_net.py trains and evaluates with it
through Detectron2's DefaultTrainer flow. tests/configs/test_yacs_config.py compares the R-50 twins' outputs and
losses."""

import json
from collections.abc import Sequence

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from torch import nn

from tests.configs.test_lazy_zoo import MODEL_ZOO
from tests.configs.test_yacs_config import assert_same_instances, random_inputs, yaml_cfg
from tests.conftest import REPO_ROOT, register_coco_args, tiny_yaml_overrides
from tood.backbone import FrozenStatsBatchNorm2d
from tood.data.checks import DatasetNotRegisteredError
from tood.engine import ConfigKeyError, Trainer, argument_parser, main
from tood.engine.defaults import setup_yaml
from tood.engine.launcher import is_yacs_config
from tood.engine.training import load_config
from tood.meta_arch import TOOD
from tood.transforms import ResizeKeepRatioCV2

CONFIG_DIR = REPO_ROOT / "configs"
YAML_1X = "COCO-Detection/tood_R_50_FPN_1x.yaml"
TWINS = {  # YAML config (under configs/) -> its LazyConfig
    YAML_1X: "tood_R_50_1x.py",
    "COCO-Detection/tood_R_50_FPN_anchor_based_1x.yaml": "tood_R_50_anchor_based_1x.py",
    "COCO-Detection/tood_R_50_FPN_2x_ms.yaml": "tood_R_50_2x_ms.py",
    "COCO-Detection/tood_R_101_FPN_2x_ms.yaml": "tood_R_101_2x_ms.py",
    "COCO-Detection/tood_R_101_FPN_dcnv2_2x_ms.yaml": "tood_R_101_dcnv2_2x_ms.py",
    "COCO-Detection/tood_X_101_64x4d_FPN_2x_ms.yaml": "tood_X_101_64x4d_2x_ms.py",
    "COCO-Detection/tood_X_101_64x4d_FPN_dcnv2_2x_ms.yaml": "tood_X_101_64x4d_dcnv2_2x_ms.py",
}


def lazy_cfg(name):
    return LazyConfig.load(str(CONFIG_DIR / name))


def settings(module: nn.Module) -> dict:
    """The plain-valued attributes of a module (strides, eps, thresholds, ...), sequences as lists."""
    scalar = (bool, int, float, str, type(None))
    found = {}
    for k, v in vars(module).items():
        if isinstance(v, scalar):
            found[k] = v
        elif isinstance(v, Sequence) and all(isinstance(x, scalar) for x in v):  # LazyConfig gives ListConfigs
            found[k] = list(v)
    found.pop("_logged_phase", None)
    return found


def test_every_lazyconfig_of_the_zoo_has_a_yaml_twin():
    assert sorted(TWINS.values()) == sorted(MODEL_ZOO)
    assert set(TWINS) == {f"COCO-Detection/{p.name}" for p in (CONFIG_DIR / "COCO-Detection").glob("*.yaml")}


@pytest.mark.parametrize("yaml_name, lazy_name", TWINS.items())
def test_yaml_builds_the_lazyconfig_network(yaml_name, lazy_name):
    # On the meta device: structure only, no memory or initialisation (build_model would move it to MODEL.DEVICE).
    with torch.device("meta"):
        from_yaml, from_lazy = TOOD(yaml_cfg(yaml_name)), instantiate(lazy_cfg(lazy_name).model)
    modules = list(from_yaml.named_modules())
    assert [(k, type(m)) for k, m in modules] == [(k, type(m)) for k, m in from_lazy.named_modules()]
    for (name, module), twin in zip(modules, from_lazy.modules()):
        assert settings(module) == settings(twin), name
    assert [(k, v.shape) for k, v in from_yaml.state_dict().items()] == [
        (k, v.shape) for k, v in from_lazy.state_dict().items()
    ]
    trainable = [k for k, p in from_yaml.named_parameters() if p.requires_grad]
    assert trainable == [k for k, p in from_lazy.named_parameters() if p.requires_grad]
    # The reference: stem and res2 wholly frozen; the frozen-statistics norms of res3-res5 train weight and bias.
    assert {k for k, _ in from_yaml.named_parameters()} - set(trainable) == {
        k
        for k, _ in from_yaml.named_parameters()
        if k.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))
    }
    assert isinstance(from_yaml.backbone.bottom_up.res3[0].conv1.norm, FrozenStatsBatchNorm2d)
    assert "backbone.bottom_up.res3.0.conv1.norm.weight" in trainable


def test_dcn_twins_compute_the_same():
    torch.manual_seed(0)
    from_yaml = build_model(yaml_cfg("COCO-Detection/tood_R_101_FPN_dcnv2_2x_ms.yaml"))
    from_lazy = instantiate(lazy_cfg("tood_R_101_dcnv2_2x_ms.py").model)
    with torch.no_grad():
        # Offsets start at zero (a plain conv): random ones make both sample between pixels, as after training.
        for name, param in from_lazy.named_parameters():
            if "offset" in name:
                param.normal_(std=0.01)
    from_yaml.load_state_dict(from_lazy.state_dict())
    for model in (from_yaml, from_lazy):
        model.eval()
        model.test_score_thresh = 0.0  # random weights score about 0.01: keep detections on every level
    inputs = random_inputs(with_instances=False, size=(64, 64))[:1]
    with torch.no_grad():
        outputs = [model(inputs) for model in (from_yaml, from_lazy)]
    for out_yaml, out_lazy in zip(*outputs):
        assert len(out_yaml["instances"]) == 100
        assert_same_instances(out_yaml["instances"], out_lazy["instances"])


def _augmentation(aug):
    """An augmentation's type and settings; a resize's short edges as the set it draws from."""
    found = dict(vars(aug))
    if isinstance(aug, ResizeKeepRatioCV2):
        edges, style = found.pop("short_edge_length"), found.pop("sample_style")
        found["short_edges"] = set(range(edges[0], edges[1] + 1)) if style == "range" else set(edges)
    return type(aug), found


@pytest.mark.parametrize("yaml_name, lazy_name", TWINS.items())
def test_yaml_has_the_lazyconfig_schedule_data_and_solver(yaml_name, lazy_name):
    cfg, lazy = yaml_cfg(yaml_name), lazy_cfg(lazy_name)
    max_iter = lazy.train.max_iter
    assert cfg.SOLVER.MAX_ITER == max_iter
    assert cfg.MODEL.TOOD.TAL_START_ITER == lazy.model.tal_start_iter
    assert cfg.SOLVER.CHECKPOINT_PERIOD == lazy.train.checkpointer.period
    assert cfg.TEST.EVAL_PERIOD == lazy.train.eval_period
    assert cfg.SOLVER.IMS_PER_BATCH == lazy.dataloader.train.total_batch_size
    assert cfg.MODEL.WEIGHTS == lazy.train.init_checkpoint
    assert (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD) == (list(lazy.model.pixel_mean), list(lazy.model.pixel_std))

    # The same learning rate and weight decay for every kind of parameter (conv weight and bias, norm).
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    lazy.optimizer.params.model = model
    optimizers = [build_optimizer(cfg, model), instantiate(lazy.optimizer)]
    keys = ("lr", "momentum", "weight_decay", "nesterov", "dampening")
    per_param = [{id(p): [g[k] for k in keys] for g in opt.param_groups for p in g["params"]} for opt in optimizers]
    assert per_param[0] == per_param[1]

    # Learning rate at the warm-up's end (the full rate at iteration 499), around each step, at the end.
    scheduler, multiplier = build_lr_scheduler(cfg, optimizers[0]), instantiate(lazy.lr_multiplier)
    iterations = {0, 1, 250, 498, 499, 500, max_iter - 1}
    iterations |= {s + d for s in cfg.SOLVER.STEPS for d in (-1, 0)}
    for it in sorted(iterations):
        scheduler.last_epoch = it
        # How Detectron2's LRScheduler hook evaluates a LazyConfig's multiplier.
        assert scheduler.get_lr()[0] == pytest.approx(lazy.optimizer.lr * multiplier(it / max_iter), rel=1e-9), it

    # Input sizes (single or multi-scale training), flips, channel order.
    for is_train, lazy_mapper in ((True, lazy.dataloader.train.mapper), (False, lazy.dataloader.test.mapper)):
        mappers = [Trainer.build_mapper(cfg, is_train), instantiate(lazy_mapper)]
        augmentations = [[_augmentation(a) for a in m.augmentations.augs] for m in mappers]
        assert augmentations[0] == augmentations[1], is_train
        assert mappers[0].image_format == mappers[1].image_format == "RGB"


def test_reference_world_size_scales_the_tal_start_with_the_schedule():
    cfg = yaml_cfg(YAML_1X)
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 8
    cfg.freeze()
    assert Trainer.auto_scale_workers(cfg, 8) is cfg
    scaled = Trainer.auto_scale_workers(cfg, 4)  # half the images per iteration: twice the iterations
    assert (scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.BASE_LR) == (8, 0.005)
    assert (scaled.SOLVER.MAX_ITER, scaled.SOLVER.STEPS, scaled.SOLVER.CHECKPOINT_PERIOD) == (
        175920,
        (117280, 161260),
        14660,
    )
    assert scaled.MODEL.TOOD.TAL_START_ITER == 58640
    assert scaled.is_frozen() and cfg.MODEL.TOOD.TAL_START_ITER == 29320


def test_yaml_configs_are_told_from_lazyconfigs(tmp_path):
    # A LazyConfig run saves its config as YAML, which tools/train_net.py loads as a LazyConfig again.
    LazyConfig.save(lazy_cfg("tood_R_50_1x.py"), str(tmp_path / "config.yaml"))
    assert not is_yacs_config(str(tmp_path / "config.yaml"))
    assert not is_yacs_config(str(CONFIG_DIR / "tood_R_50_1x.py"))
    assert is_yacs_config(str(CONFIG_DIR / YAML_1X)) and is_yacs_config(str(CONFIG_DIR / "Base-TOOD.yaml"))


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (
            ["MODEL.TOOD.NUM_CLASS", "3"],
            ConfigKeyError,
            r"'MODEL.TOOD.NUM_CLASS'.*Did you mean MODEL\.TOOD\.NUM_CLASSES\b",
        ),
        (["SOLVER.MAX_ITER=10"], ValueError, "KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000"),
        (["SOLVER.MAX_ITER"], ValueError, "KEY VALUE pairs"),
        (
            ["DATASETS.TRAIN", "('nowhere',)"],
            DatasetNotRegisteredError,
            r"'nowhere' \(DATASETS.TRAIN\) is not registered",
        ),
    ],
)
def test_mistakes_in_yaml_overrides_are_explained(opts, error, message):
    args = argument_parser().parse_args(["--config-file", str(CONFIG_DIR / YAML_1X), *opts])
    with pytest.raises(error, match=message):
        main(args)


@pytest.mark.slow
def test_train_net_trains_and_evaluates_a_yaml_config(tiny_shapes, tmp_path):
    """tools/train_net.py's ``main`` in this process: the tiny model trains 4 iterations (checkpoints, the switch to
    TAL, a final evaluation), then ``--eval-only`` with the config the run saved and its final weights."""
    out = tmp_path / "run"
    args = argument_parser().parse_args(
        ["--config-file", str(CONFIG_DIR / YAML_1X), *register_coco_args(tiny_shapes, "yaml_zoo_tiny")]
        + tiny_yaml_overrides("yaml_zoo_tiny", out)
    )
    main(args)
    files = {p.name for p in out.iterdir()}
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "config.yaml", "metrics.json"} <= files
    assert "Iteration 2: task-aligned assignment" in (out / "log.txt").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    final_ap = [m["bbox/AP"] for m in metrics if "bbox/AP" in m]
    assert len(final_ap) == 1

    # The dataset is still registered in this process: no --register-coco again.
    args = argument_parser().parse_args(
        ["--config-file", str(out / "config.yaml"), "--eval-only"]
        + ["MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path / "eval")]
    )
    results = main(args)
    assert results["bbox"]["AP"] == pytest.approx(final_ap[0], abs=1e-6)


@pytest.mark.parametrize("config", [*TWINS, *TWINS.values()])
def test_train_net_takes_every_zoo_config(config, tiny_shapes, tmp_path):
    """tools/train_net.py's set-up of each zoo config, YAML and LazyConfig, on a registered dataset: overrides,
    checks and schedule pass (each config builds and trains a step in tests/configs/test_lazy_zoo.py; the YAML twins
    build the same model above)."""
    register = register_coco_args(tiny_shapes, "zoo_tiny")
    if is_yacs_config(str(CONFIG_DIR / config)):
        opts = ["DATASETS.TRAIN", "('zoo_tiny',)", "DATASETS.TEST", "('zoo_tiny',)", "MODEL.WEIGHTS", ""]
        opts += ["OUTPUT_DIR", str(tmp_path)]
        cfg = setup_yaml(argument_parser().parse_args(["--config-file", str(CONFIG_DIR / config), *register, *opts]))
        assert cfg.DATASETS.TRAIN == ("zoo_tiny",) and cfg.SOLVER.MAX_ITER > cfg.MODEL.TOOD.TAL_START_ITER
    else:
        opts = ["dataloader.train.dataset.names=zoo_tiny", "dataloader.test.dataset.names=zoo_tiny"]
        opts += ["model.num_classes=6", 'train.init_checkpoint=""', f"train.output_dir={tmp_path}"]
        cfg, _ = load_config(
            argument_parser().parse_args(["--config-file", str(CONFIG_DIR / config), *register, *opts])
        )
        # A dataset of a few images: one iteration per epoch, and the schedule counts its epochs.
        assert cfg.train.iters_per_epoch == 1 and cfg.model.tal_start_iter == 4
