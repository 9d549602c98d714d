"""tools/gpu_check.py where no GPU is (its help, and its one-line answer without CUDA, from an empty folder, as in a
fresh clone), and its measurements (benchmarks/gpu.py) run small on the CPU."""

import os
import subprocess
import sys

import pytest

from benchmarks import gpu
from tests.conftest import REPO_ROOT, load_tool

R50 = str(REPO_ROOT / "configs" / "tood_R_50_1x.py")
QUICK = str(REPO_ROOT / "configs" / "quickstart_shapes.py")


def run_gpu_check(cwd, *args):
    # No GPU, even on a machine that has one; this checkout's benchmarks package, whichever checkout is installed.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "gpu_check.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_help(tmp_path):
    proc = run_gpu_check(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--output" in proc.stdout and "--reference" in proc.stdout and "tools/gpu_check.py --output" in proc.stdout


def test_without_cuda_it_says_so_and_measures_nothing(tmp_path):
    proc = run_gpu_check(tmp_path, "--output", "figures.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "No CUDA device here: tools/gpu_check.py measures nothing on this machine."
    ]
    assert list(tmp_path.iterdir()) == []


def test_table_flattens_the_figures():
    text = load_tool("gpu_check").table({"device": "X", "assigner": {"500": {"ms": 1.23456, "anchors": 19953}}})
    assert text.splitlines()[2:] == [
        "| device |  | X |",
        "| assigner: 500 | ms | 1.235 |",
        "| assigner: 500 | anchors | 19953 |",
    ]


def test_measurements_run_on_cpu(one_thread):
    """Each measurement but the reference's, small: DCNv2 as torchvision's kernel (here its CPU one) to float32
    round-off, the assigner, training speed, and float16 training."""
    layers = [("R-101 res3", 16, 16, 1, 12, 20), ("X-101-64x4d res4", 64, 64, 8, 6, 10)]
    dcn = gpu.dcn_parity("cpu", layers)
    assert set(dcn) == {"R-101 res3", "X-101-64x4d res4"}
    assert all(r["relative"] <= 1e-5 and r["torchvision_ms"] > 0 for r in dcn.values()), dcn
    (cost,) = gpu.assigner_cost("cpu", [20], iters=1).values()
    assert cost["anchors"] == 19953 and cost["ms"] > 0
    speed = gpu.training_speed(QUICK, "cpu", amp=False, size=(64, 64), batch=1, iters=1, warmup=0)
    assert speed["s_per_iter"] > 0
    runs = gpu.float16_training(QUICK, "cpu", steps=2, size=(64, 64), batch=2)
    assert set(runs) == {"float32", "float16"}
    assert runs["float16"]["first_loss"] == pytest.approx(runs["float32"]["first_loss"], rel=1e-2)


@pytest.mark.slow  # the R-50 forward at 800 x 800, and a float16 step
def test_reference_measurements_run_on_cpu(e2e_oracle):
    """On the CPU, the parity check passes (as tests/parity/test_e2e_parity.py), and a float16 step of R-50 at
    128 px follows float32 (tolerances: tests/engine/test_float16.py)."""
    parity = gpu.inference_parity(R50, e2e_oracle, "cpu")
    assert parity["passed"] and parity["same_count_and_labels"], parity
    step = gpu.float16_step0(R50, e2e_oracle, "cpu", size=128)
    assert step["float16_finite"] and not step["float16_skipped"]
    assert step["loss_cls_relative"] < 4e-3 and step["grad_norm_relative"] < 1.1e-2, step
