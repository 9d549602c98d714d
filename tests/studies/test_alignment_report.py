"""studies/alignment_report.py and tools/analyze_alignment.py: the report (the tool end to end, and the comparison
of two models) on a tiny generated dataset with random-weight models; the tool's argument errors."""

import json
import subprocess
import sys

import matplotlib.image
import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog

from studies.alignment_report import alignment_report
from tests.conftest import REPO_ROOT, load_tool
from tests.modeling.test_alignment import write_config
from tood.data import register_shapes_dataset


@pytest.fixture(scope="module")
def tiny_dataset_root(tmp_path_factory):
    """4 generated 128 px images registered as alignment_tiny; returns their root folder."""
    root = tmp_path_factory.mktemp("d")
    register_shapes_dataset("alignment_tiny", num_images=4, seed=0, image_size=128, root=root)
    return root


@pytest.fixture(scope="module")
def tiny_dataset(tiny_dataset_root):
    """The number of objects of alignment_tiny."""
    return sum(len(d["annotations"]) for d in DatasetCatalog.get("alignment_tiny"))


def _checkpoint(tmp_path, arch):
    """(config file, random-weight checkpoint) of a tiny model."""
    config = write_config(tmp_path, arch)
    model = instantiate(LazyConfig.load(config).model)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save(f"{arch.lower()}_random")
    return config, str(tmp_path / f"{arch.lower()}_random.pth")


def _check_metrics(metrics, num_objects):
    assert (metrics["num_images"], metrics["num_objects"]) == (4, num_objects)
    assert 0 < metrics["pcc_objects"] <= metrics["objects_with_candidates"] <= num_objects
    assert -1.0 <= metrics["pcc"] <= 1.0
    assert 0.0 <= metrics["top1_agreement"] <= 1.0 and 0.1 < metrics["top1_iou"] <= 1.0
    assert 0 <= metrics["nms_misranked"] <= metrics["nms_kept"]


def run_tool(*args, cwd):
    """tools/analyze_alignment.py with ``args`` in a fresh process; returns the CompletedProcess."""
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "analyze_alignment.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_tool_single_model(tmp_path, tiny_dataset_root, tiny_dataset):
    """The tool end to end, in its own process: its config registers alignment_tiny there."""
    config, weights = _checkpoint(tmp_path, "TOOD")
    registering_config = tmp_path / "registered.py"
    registering_config.write_text(
        "from detectron2.config import LazyConfig\n"
        "from tood.data import register_shapes_dataset\n"
        f"register_shapes_dataset('alignment_tiny', 4, seed=0, image_size=128, root={str(tiny_dataset_root)!r})\n"
        f"_base = LazyConfig.load({config!r})\n"
        "model, dataloader, train = _base.model, _base.dataloader, _base.train\n"
    )
    out = tmp_path / "out"
    proc = run_tool(
        "--config-file",
        str(registering_config),
        "--weights",
        weights,
        "--output",
        str(out),
        "--num-figures",
        "2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "alignment.json").read_text())["models"]
    # The model is named after its config file.
    assert list(results) == ["registered"]
    metrics = results["registered"]
    _check_metrics(metrics, tiny_dataset)
    assert any(line.startswith("|") and " registered " in line for line in proc.stdout.splitlines())
    assert len(metrics["figures"]) == 2
    for path in [*metrics["figures"], out / "scatter.png"]:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100


def test_report_compares_models(tmp_path, tiny_dataset):
    models = {arch: _checkpoint(tmp_path, arch) for arch in ("TOOD", "RetinaNet")}
    out = tmp_path / "out"
    results = alignment_report(models, str(out), max_images=3, num_figures=1)
    assert list(results) == ["TOOD", "RetinaNet"]
    for metrics in results.values():
        assert metrics["num_images"] == 3 and len(metrics["figures"]) == 1
    # RetinaNet's anchors of sizes 32 and 40 at one location overlap by IoU 0.64 > its NMS threshold 0.5: with
    # near-zero random deltas they suppress each other (TOOD's random boxes overlap by at most 1/3: none).
    assert results["RetinaNet"]["nms_kept"] > 0 and results["TOOD"]["nms_kept"] == 0
    saved = json.loads((out / "alignment.json").read_text())
    assert "TOOD" in saved["table"] and "RetinaNet" in saved["table"]
    # One scatter figure, a panel per model: twice as wide as a single model's (4.5 in at 100 dpi each).
    assert matplotlib.image.imread(out / "scatter.png").shape[1] == 900


def test_tool_rejects_bad_arguments(capsys):
    tool = load_tool("analyze_alignment")
    for args, message in [
        (["--config-file", "a.py"], "--config-file and --weights are required"),
        (["--compare", "no-weights.py"], "expected NAME=CONFIG:WEIGHTS"),
        (["--compare", "A=a.py:a.pth", "--config-file", "b.py"], "use either --compare or --config-file/--weights"),
        (["--compare", "A=a.py:a.pth", "--compare", "A=b.py:b.pth"], "model names must be unique"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tool.parse_args(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, args
    # The weights may be a URL: the spec splits at the first ':'.
    assert tool.parse_args(["--compare", "R=cfg.py:detectron2://x/model.pkl"]).models == [
        ("R", "cfg.py", "detectron2://x/model.pkl")
    ]
    assert tool.parse_args(["--config-file", "c/tood.py", "--weights", "w.pth"]).models == [
        ("tood", "c/tood.py", "w.pth")
    ]
