"""tools/benchmark.py end to end at a tiny size on CPU: every table and row is printed with numbers, and the profile
charges the training step's backward to the model's parts. Checks what the tool prints, not how fast anything is."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

TINY = ["--device", "cpu", "--threads", "1", "--size", "128x160", "--iters", "1", "--warmup", "0"]
NUMBER = r"\d+(?:\.\d+)?"


def run_benchmark(*args):
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmark.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )
    return out.stdout


def table_rows(text):
    """{first cell: other cells} of the Markdown table rows, without header and separator rows."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[1]) <= set("-:") and cells[0] not in ("measurement", "part"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def benchmark_output():
    return run_benchmark(*TINY, "--batch-sizes", "1", "2", "--flops-size", "128x160", "--assigner-gts", "3")


def test_every_row_is_printed_with_the_ratio(benchmark_output):
    rows = table_rows(benchmark_output)
    expected = [
        "parameters (M)",
        "trainable parameters (M)",
        "GFLOPs 128x160 (fvcore): total",
        "GFLOPs 128x160 (fvcore): backbone: ResNet",
        "GFLOPs 128x160 (fvcore): backbone: FPN",
        "GFLOPs 128x160 (fvcore): head",
        "inference batch 1: ms / batch",
        "inference batch 1: images / s",
        "inference batch 2: ms / batch",
        "inference batch 2: images / s",
        "training batch 2: s / iteration",
        "training batch 2: extra peak MB (peak RSS)",
    ]
    for label in expected:
        tood, retinanet, ratio = rows[label]
        assert all(re.fullmatch(NUMBER, v) for v in (tood, retinanet, ratio)), (label, rows[label])
        assert float(tood) > 0 and float(retinanet) > 0
        # The ratio is of the unrounded figures: within what the printed roundings allow.
        t, r, e = float(tood), float(retinanet), 0.5 * 10.0 ** -len(tood.partition(".")[2])
        assert (t - e) / (r + e) - 0.005 <= float(ratio) <= (t + e) / (r - e) + 0.005, (label, rows[label])
    assert "CPU (1 threads), fp32, 128x160, median of 1 after 0 warm-up" in benchmark_output


def test_sizes_add_up(benchmark_output):
    rows = table_rows(benchmark_output)
    # The two detectors' well-known sizes (random weights, 80 classes): TOOD's head is lighter than RetinaNet's.
    # TOOD: 32.15 M with FrozenBN, plus the weight and bias of the res3-res5 norms, trained as the reference does
    # (2 x (4 x 768 + 512 + 6 x 1536 + 1024 + 3 x 3072 + 2048) = 50,176).
    assert float(rows["parameters (M)"][0]) == pytest.approx(32.20, abs=0.01)
    assert float(rows["parameters (M)"][1]) == pytest.approx(37.92, abs=0.01)
    # Both train with the stem and res2 frozen, as Detectron2's RetinaNet 1x config and TOOD's do.
    for model in (0, 1):
        assert float(rows["trainable parameters (M)"][model]) < float(rows["parameters (M)"][model]) - 0.2
    for model in (0, 1):
        parts = [
            float(rows[f"GFLOPs 128x160 (fvcore): {p}"][model]) for p in ("backbone: ResNet", "backbone: FPN", "head")
        ]
        assert sum(parts) == pytest.approx(float(rows["GFLOPs 128x160 (fvcore): total"][model]), abs=0.15)
    # Throughput is the batch over the latency.
    for batch in (1, 2):
        latency_ms = float(rows[f"inference batch {batch}: ms / batch"][0])
        assert float(rows[f"inference batch {batch}: images / s"][0]) == pytest.approx(
            batch / latency_ms * 1000, rel=0.02
        )


def test_assigner_table(benchmark_output):
    assert re.search(rf"^\| 19953 \| 3 \| {NUMBER} \| {NUMBER} \| {NUMBER}x \|$", benchmark_output, re.M)


def test_profile_charges_parts():
    out = run_benchmark(*TINY, "--profile")
    tood, retinanet = out.split("RetinaNet, CPU")
    tood_rows, retinanet_rows = table_rows(tood), table_rows(retinanet)
    for part in ("head: task decomposition", "head: box alignment (offsets, sampling)", "assignment", "losses"):
        assert part in tood_rows
    assert "head: task decomposition" not in retinanet_rows
    # Backward ops are found through the autograd sequence numbers: those of TOOD's nested head parts, and those of
    # RetinaNet's focal loss, a TorchScript function whose graph records no number.
    assert float(tood_rows["head: task decomposition"][1]) > 0
    assert float(retinanet_rows["losses"][1]) > 0
    for rows in (tood_rows, retinanet_rows):
        forward, backward, _, inference, _ = (float(v) for v in rows["backbone: ResNet"])
        assert forward > 0 and backward > 0 and inference > 0
        total = [float(v) for v in rows["total"]]
        assert total[2] == pytest.approx(100) and total[4] == pytest.approx(100)
        assert float(rows.get("rest", [0, 0])[1]) <= 0.005 * total[1]  # next to no backward time left unattributed
        for column in (0, 1, 3):  # rows are rounded to the millisecond
            parts = [float(v[column]) for k, v in rows.items() if k != "total"]
            assert sum(parts) == pytest.approx(total[column], abs=len(parts))
