"""Detectron2's DefaultTrainer path: ``tood.engine.Trainer`` trains, checkpoints, evaluates with COCOEvaluator and
resumes a YAML-configured TOOD, with the checks of the LazyConfig path (finite losses, weights files)."""

import math
import os

import pytest
import torch
from detectron2.config import get_cfg

from tests.conftest import REPO_ROOT, reregister_coco, tiny_yaml_overrides
from tood import add_tood_config
from tood.engine import Trainer
from tood.engine.train_loop import CheckedSimpleTrainer


def tiny_cfg(tiny_shapes, tmp_path, **overrides):
    """configs/COCO-Detection/tood_R_50_FPN_1x.yaml shrunk: R-18 with trainable BN, 64 channels, 128 px images."""
    reregister_coco("yaml_tiny", tiny_shapes / "annotations.json", tiny_shapes / "images")
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "COCO-Detection" / "tood_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(tiny_yaml_overrides("yaml_tiny", tmp_path / "run", **overrides))
    return cfg


@pytest.mark.slow
def test_trainer_trains_checkpoints_evaluates_and_resumes(tiny_shapes, tmp_path):
    cfg = tiny_cfg(tiny_shapes, tmp_path)
    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, CheckedSimpleTrainer)  # the finite-loss check of the LazyConfig path
    trainer.resume_or_load(resume=False)
    trainer.train()
    files = set(os.listdir(cfg.OUTPUT_DIR))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"} <= files
    # The hooks are built once: one event file, one metrics writer.
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1
    results = trainer.test(cfg, trainer.model)  # COCOEvaluator, from build_evaluator
    assert math.isfinite(results["bbox"]["AP"])
    history = trainer.storage.history("total_loss").values()
    assert len(history) == 4 and all(math.isfinite(v) for v, _ in history)

    # Resuming continues after the last checkpoint with the trainer's state (iteration, optimizer, scheduler).
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.scheduler.last_epoch == trainer.scheduler.last_epoch


def test_missing_weights_name_the_file_and_the_ways_forward(tiny_shapes, tmp_path):
    cfg = tiny_cfg(tiny_shapes, tmp_path, **{"MODEL.WEIGHTS": str(tmp_path / "nowhere.pkl")})
    trainer = Trainer(cfg)
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS=.*nowhere.pkl does not exist.*convert_torchvision"):
        trainer.resume_or_load(resume=False)


def test_a_nonfinite_loss_stops_before_the_step(tiny_shapes, tmp_path):
    cfg = tiny_cfg(tiny_shapes, tmp_path, **{"SOLVER.BASE_LR": 1e30})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match="Loss is NaN or infinite at iteration"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
