"""Detectron2's DefaultTrainer path: ``tood.engine.Trainer`` trains, checkpoints, evaluates with COCOEvaluator and
resumes a YAML-configured TOOD, with the checks of the LazyConfig path (finite losses, weights files)."""

import math
import os

import pytest
import torch
from detectron2.config import get_cfg

from tests.conftest import REPO_ROOT
from tood import add_tood_config
from tood.data import register_shapes_dataset
from tood.engine import Trainer
from tood.engine.train_loop import CheckedSimpleTrainer


def tiny_cfg(tmp_path, **overrides):
    """configs/COCO-Detection/tood_R_50_FPN_1x.yaml shrunk: R-18 with trainable BN, 64 channels, 128 px images."""
    register_shapes_dataset("yaml_tiny", num_images=8, seed=0, image_size=128, root=tmp_path / "data")
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "COCO-Detection" / "tood_R_50_FPN_1x.yaml"))
    opts = {
        "MODEL.DEVICE": "cpu",
        "MODEL.WEIGHTS": "",
        "MODEL.RESNETS.DEPTH": 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.RESNETS.NORM": "BN",
        "MODEL.BACKBONE.FREEZE_AT": 0,
        "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.TOOD.FEAT_CHANNELS": 64,
        "MODEL.TOOD.NUM_CONVS": 2,
        "MODEL.TOOD.NUM_CLASSES": 6,
        "MODEL.TOOD.TAL_START_ITER": 2,
        "MODEL.TOOD.SCORE_THRESH_TEST": 0.0,
        "DATASETS.TRAIN": ("yaml_tiny",),
        "DATASETS.TEST": ("yaml_tiny",),
        "DATALOADER.NUM_WORKERS": 0,
        "INPUT.MIN_SIZE_TRAIN": (128,),
        "INPUT.MAX_SIZE_TRAIN": 128,
        "INPUT.MIN_SIZE_TEST": 128,
        "INPUT.MAX_SIZE_TEST": 128,
        "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.BASE_LR": 0.001,
        "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.MAX_ITER": 4,
        "SOLVER.STEPS": (3,),
        "SOLVER.CHECKPOINT_PERIOD": 2,
        "OUTPUT_DIR": str(tmp_path / "run"),
        **overrides,
    }
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


@pytest.mark.slow
def test_trainer_trains_checkpoints_evaluates_and_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, CheckedSimpleTrainer)  # the finite-loss check of the LazyConfig path
    trainer.resume_or_load(resume=False)
    trainer.train()
    files = set(os.listdir(cfg.OUTPUT_DIR))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= files
    results = trainer.test(cfg, trainer.model)  # COCOEvaluator, from build_evaluator
    assert math.isfinite(results["bbox"]["AP"])
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 4 and all(math.isfinite(v) for v, _ in history)

    # Resuming continues after the last checkpoint with the trainer's state (iteration, optimizer, scheduler).
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.scheduler.last_epoch == trainer.scheduler.last_epoch


def test_missing_weights_name_the_file_and_the_ways_forward(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"MODEL.WEIGHTS": str(tmp_path / "nowhere.pkl")})
    trainer = Trainer(cfg)
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS=.*nowhere.pkl does not exist.*convert_torchvision"):
        trainer.resume_or_load(resume=False)


def test_a_nonfinite_loss_stops_before_the_step(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"SOLVER.BASE_LR": 1e30})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="Loss is NaN or infinite at iteration"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
