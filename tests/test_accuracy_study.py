"""tools/accuracy_study.py's baseline configs: RetinaNet and FCOS share everything with the TOOD quick start but
the detector; and the study (tood.accuracy_study) trains, evaluates, tabulates, plots, resumes and reuses a TOOD
run end to end on a tiny generated dataset."""

import math
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT
from tood.accuracy_study import run_study
from tood.data import register_shapes_dataset

# The models of tools/accuracy_study.py, in its order.
MODELS = {
    name: str(REPO_ROOT / "configs" / f"quickstart_shapes{suffix}.py")
    for name, suffix in (("TOOD", ""), ("RetinaNet", "_retinanet"), ("FCOS", "_fcos"))
}

# The quick start's data at 128 px on 6 + 3 generated images, batch 2.
TINY = [
    "dataloader.train.dataset.names=study_train",
    "dataloader.test.dataset.names=study_val",
    "dataloader.train.total_batch_size=2",
    *(
        f"dataloader.{split}.mapper.augmentations.0.{key}=128"
        for split in ("train", "test")
        for key in ("short_edge_length", "max_size")
    ),
    # A few iterations leave every score under the models' thresholds: keep all candidates, so that AP is a number.
    "model.test_score_thresh=0.0",
]


@pytest.fixture
def one_thread():
    # The tiny models gain nothing from a second thread, and threads that outnumber the free cores (another job
    # running) slow torch's CPU ops down manyfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tree(node):
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def test_baselines_share_all_but_the_detector():
    tood, *baselines = (LazyConfig.load(path) for path in MODELS.values())
    backbone = instantiate(tood.model.backbone)
    for cfg in baselines:
        for key in ("dataloader", "optimizer", "train", "lr_multiplier"):
            assert _tree(cfg[key]) == _tree(tood[key]), key
        for key in ("backbone", "num_classes", "head_in_features", "pixel_mean", "pixel_std"):
            assert _tree(cfg.model[key]) == _tree(tood.model[key]), key
        # Head towers as wide and deep as TOOD's quick-start T-Head.
        assert cfg.model.head.conv_dims == [tood.model.head.feat_channels] * tood.model.head.stacked_convs == [64] * 4
        assert [s.channels for s in cfg.model.head.input_shape] == [64] * 5
        model = instantiate(cfg.model)
        assert type(model.backbone) is type(backbone)
        assert {k: v.shape for k, v in model.backbone.state_dict().items()} == {
            k: v.shape for k, v in backbone.state_dict().items()
        }
        # GroupNorm(32, 64) in the towers, as get_norm("GN") would give.
        norms = [m for m in model.head.cls_subnet if type(m).__name__ == "GroupNorm"]
        assert len(norms) == 4 and all(m.num_groups == 32 and m.num_channels == 64 for m in norms)


@pytest.mark.slow
def test_study_trains_evaluates_and_reports_three_models(tmp_path, one_thread):
    register_shapes_dataset("study_train", 6, seed=0, image_size=128, root=tmp_path / "data")
    register_shapes_dataset("study_val", 3, seed=1, image_size=128, root=tmp_path / "data")
    out = tmp_path / "study"
    results = run_study(MODELS, str(out), max_iter=4, eval_period=2, opts=TINY)

    assert list(results) == ["TOOD", "RetinaNet", "FCOS"]
    for name, run in results.items():
        # Evaluated after iteration 2 (the period) and at the end.
        assert run["iterations"] == 4 and list(run["evaluations"]) == [2, 4], name
        assert all(math.isfinite(run["evaluations"][4][m]) for m in ("AP", "AP50", "AP75")), name
        # log.txt gives whole seconds: these runs take under one.
        assert run["wall_s"] is not None and run["s_per_iter"] > 0, name
        assert (out / name.lower() / "model_final.pth").is_file()
        # Each run's log holds its own training only.
        assert (out / name.lower() / "log.txt").read_text().count("Total training time") == 1
    table = (out / "results.md").read_text()
    for name, run in results.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        assert f"| {run['evaluations'][4]['AP']:.1f} " in row
    assert (out / "ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: every model is finished, so nothing trains and the report is the same.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert run_study(MODELS, str(out), max_iter=4, eval_period=2, opts=TINY) == results
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == mtimes

    # TOOD's numbers from an existing run.
    reused = tmp_path / "reused"
    finished = {"TOOD": str(out / "tood")}
    assert run_study({"TOOD": MODELS["TOOD"]}, str(reused), max_iter=4, finished_runs=finished) == {
        "TOOD": results["TOOD"]
    }
    assert sorted(os.listdir(reused)) == ["ap.png", "results.md"]
