"""tools/benchmark_training.py end to end at a tiny size on CPU: one row per combination of the axes, in order, with
consistent numbers; config variants reach the model they time. Checks what the tool prints, not how fast anything
is."""

import re
import subprocess
import sys

import pytest
import torch

from benchmarks import training
from tests.conftest import REPO_ROOT, load_tool
from tests.studies.test_benchmark import NUMBER, table_rows

TOOL = REPO_ROOT / "tools" / "benchmark_training.py"
TINY = ["--threads", "1", "--sizes", "64x96", "--iters", "1", "--warmup", "0", "--gts", "2"]


def run_tool(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *args], check=True, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600
    )


def test_one_row_per_combination_first_is_the_baseline():
    out = run_tool(
        *TINY,
        "--variant",
        "as is:",
        "--variant",
        "one head conv: model.head.stacked_convs=1",
        "--memory-format",
        "contiguous",
        "channels_last",
        "--batch-sizes",
        "1",
        "2",
    ).stdout
    rows = table_rows(out)
    assert rows.pop("variant") == ["s / iteration", "images / s", "time vs first"]
    expected = [
        f"{config}, fp32, {memory_format}, 64x96, batch {batch}"
        for config in ("as is", "one head conv")
        for memory_format in ("contiguous", "channels_last")
        for batch in (1, 2)
    ]
    assert list(rows) == expected
    assert rows[expected[0]][2] == "1.00"
    for name, (seconds, images_per_s, ratio) in rows.items():
        assert all(re.fullmatch(NUMBER, cell) for cell in (seconds, images_per_s, ratio))
        batch = int(name.rsplit(" ", 1)[1])
        assert float(images_per_s) == pytest.approx(batch / float(seconds), rel=0.05, abs=0.06)
    assert "CPU (1 threads), median of 1 alternating rounds after 0 warm-up" in out


def test_a_malformed_variant_is_refused_with_the_expected_form(capsys):
    parser = load_tool("benchmark_training").argument_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--variant", "model.head.stacked_convs=1"])
    assert exit_info.value.code == 2
    assert 'expected "NAME: key=value ..."' in capsys.readouterr().err
    assert parser.parse_args(["--variant", "narrow: model.head.stacked_convs=1"]).variant == [
        ("narrow", ["model.head.stacked_convs=1"])
    ]


def test_variants_reach_the_model_they_time():
    (narrow,) = training.training_variants(
        {"narrow": ["model.head.stacked_convs=1"]}, memory_formats=["channels_last"], sizes=[(64, 64)], batches=[1]
    )
    step = training._train_step(str(REPO_ROOT / "configs" / "quickstart_shapes.py"), narrow, "cpu", num_gts=2)
    model = step.trainer.model
    assert len(model.head.inter_convs) == 1
    assert model.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(next(step.trainer.data_loader)) == 1
