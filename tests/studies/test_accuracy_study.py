"""tools/accuracy_study.py's baseline configs: RetinaNet and FCOS share everything with the TOOD quick start but
the detector; and the study's protocol (studies.accuracy.run_protocol) sweeps, selects on the tuning split,
trains the seeds, evaluates with own and matched post-processing, measures alignment, tabulates, plots and
resumes, end to end on a tiny generated dataset."""

import json
import math

import pytest
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf

from studies.accuracy import MATCHED_POSTPROCESSING, Detector, Setting, run_protocol, train
from tests.conftest import REPO_ROOT
from tood.data import register_shapes_dataset

# The models of tools/accuracy_study.py, in its order.
MODELS = {
    name: str(REPO_ROOT / "configs" / f"quickstart_shapes{suffix}.py")
    for name, suffix in (("TOOD", ""), ("RetinaNet", "_retinanet"), ("FCOS", "_fcos"))
}

# The quick start's data at 128 px on 6 + 3 generated images, batch 2.
TINY = [
    "dataloader.train.dataset.names=study_train",
    "dataloader.train.total_batch_size=2",
    *(
        f"dataloader.{split}.mapper.augmentations.0.{key}=128"
        for split in ("train", "test")
        for key in ("short_edge_length", "max_size")
    ),
    # A few iterations leave every score under the models' thresholds: keep all candidates, so that AP is a number.
    "model.test_score_thresh=0.0",
]


def _tree(node):
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def test_baselines_share_all_but_the_detector():
    tood, *baselines = (LazyConfig.load(path) for path in MODELS.values())
    backbone = instantiate(tood.model.backbone)
    for cfg in baselines:
        for key in ("dataloader", "optimizer", "train", "lr_multiplier"):
            ours, theirs = _tree(cfg[key]), _tree(tood[key])
            if key == "train":
                # The study trains every detector in float32 (train.amp.enabled=False for all, see run_protocol).
                assert ours.pop("amp") == {"enabled": False} and theirs.pop("amp") == {"enabled": None}
            assert ours == theirs, key
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
def test_protocol_sweeps_selects_seeds_and_reports(tmp_path, one_thread):
    register_shapes_dataset("study_train", 6, seed=0, image_size=128, root=tmp_path / "data")
    register_shapes_dataset("study_tune", 3, seed=1, image_size=128, root=tmp_path / "data")
    register_shapes_dataset("study_val", 3, seed=2, image_size=128, root=tmp_path / "data")
    detectors = {
        "TOOD": Detector(MODELS["TOOD"]),
        "FCOS": Detector(MODELS["FCOS"]),
        "TOOD (ATSS only)": Detector(MODELS["TOOD"], ("model.tal_start_iter=1000000",), tuned_like="TOOD"),
    }
    settings = [Setting("AdamW", 1e-3, 0.05), Setting("SGD", 0.02, 1e-4)]
    out = tmp_path / "study"
    kwargs = dict(
        settings=settings,
        seeds=(0, 1),
        max_iter=3,
        tune_dataset="study_tune",
        test_dataset="study_val",
        alignment_images=2,
        opts=TINY,
    )
    results = run_protocol(detectors, str(out), **kwargs)

    # The sweep: every setting of every detector but the control, trained with the first seed, judged on the
    # tuning split; the selected setting is the best there, and the control takes TOOD's.
    assert list(results["sweep"]) == ["TOOD", "FCOS"]
    for name, by_setting in results["sweep"].items():
        assert list(by_setting) == [s.name for s in settings]
        best = max(settings, key=lambda s: by_setting[s.name]["AP"]).name
        assert results["selected"][name] == best
        for setting in settings:
            run = out / "sweep" / name.lower() / setting.name
            assert json.loads((run / "setting.json").read_text())["optimizer"] == setting.optimizer
            evaluated = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
            assert [r["bbox/AP"] for r in evaluated if "bbox/AP" in r] == [by_setting[setting.name]["AP"]]
            assert "study_tune" in (run / "log.txt").read_text()
    assert results["selected"]["TOOD (ATSS only)"] == results["selected"]["TOOD"]
    # The optimizer the run trained with is the setting's (Detectron2 logs the config the run saved).
    assert "torch.optim.SGD" in (out / "sweep" / "fcos" / "sgd_lr0.02_wd0.0001" / "config.yaml").read_text()

    # Seeds: the sweep's run is the first seed's; the others, and every seed of the control, train anew.
    for name, runs in results["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        if name == "TOOD (ATSS only)":
            assert all("/seeds/" in r["run_dir"] for r in runs)
        else:
            assert runs[0]["run_dir"].endswith(f"sweep/{name.lower()}/{results['selected'][name]}")
        for r in runs:
            for key in ("own", "matched"):
                assert all(math.isfinite(r[key][m]) for m in ("AP", "AP50", "AP75")), (name, key)
            config = (tmp_path / r["run_dir"] / "test_matched" / "config.yaml").read_text()
            assert "study_val" in config and "test_nms_thresh: 0.6" in config
    # The control never switches to task-aligned assignment; TOOD does, after a third of its iterations.
    switch = "task-aligned assignment (TAL) from iteration"
    assert switch in (tmp_path / results["runs"]["TOOD"][0]["run_dir"] / "log.txt").read_text()
    control = out / "seeds" / "tood__atss_only_" / results["selected"]["TOOD"] / "seed0"
    assert switch not in (control / "log.txt").read_text()

    table = (out / "results.md").read_text()
    assert all(p in table for p in MATCHED_POSTPROCESSING)
    for name, runs in results["runs"].items():
        rows = [line for line in table.splitlines() if line.startswith(f"| {name} ")]
        for key in ("own", "matched"):
            assert any(", ".join(f"{r[key]['AP']:.1f}" for r in runs) in row for row in rows), (name, key)
    assert (out / "ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: everything is reused, nothing trains or evaluates again.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert run_protocol(detectors, str(out), **kwargs) == results
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json" or p.parent != out} == {
        p: t for p, t in mtimes.items() if p.name != "results.json" or p.parent != out
    }


def test_a_run_of_another_setting_is_not_reused(tmp_path):
    # A finished run's folder, trained with SGD: asked for AdamW there, the study stops before training or reading it.
    run = tmp_path / "seed1"
    run.mkdir()
    (run / "setting.json").write_text(json.dumps(Setting("SGD", 0.01, 1e-4).__dict__))
    for name in ("model_final.pth", "metrics.json"):
        (run / name).write_text("")
    with pytest.raises(RuntimeError, match=r"seed1 was trained with .*'SGD'.*move or delete it"):
        train(MODELS["TOOD"], str(run), Setting("AdamW", 1e-3, 0.05), TINY)
