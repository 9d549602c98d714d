"""tools/quickstart.py end to end, at a few iterations on a small generated dataset: it trains, evaluates, draws
predictions and says how long training took per iteration and what AP it reached."""

import re

from tests.conftest import load_tool
from tood.data import register_shapes_dataset

IMAGE_SIZE = 96


def test_quickstart_trains_evaluates_draws_and_reports(tmp_path, capsys, cpu_units):
    cpu_units(False, False, onednn_bf16=False, capability="AVX2")  # a CPU without bfloat16 units: float32
    register_shapes_dataset("qs_train", num_images=8, seed=201, image_size=IMAGE_SIZE, root=tmp_path / "data")
    register_shapes_dataset("qs_val", num_images=4, seed=202, image_size=IMAGE_SIZE, root=tmp_path / "data")
    opts = ["dataloader.train.dataset.names=qs_train", "dataloader.test.dataset.names=qs_val"]
    for split in ("train", "test"):
        opts += [
            f"dataloader.{split}.mapper.augmentations.0.short_edge_length={IMAGE_SIZE}",
            f"dataloader.{split}.mapper.augmentations.0.max_size={IMAGE_SIZE}",
        ]
    output = tmp_path / "run"
    argv = ["--max-iter", "3", "--output", str(output), "--num-images", "2", "dataloader.train.total_batch_size=2"]
    results = load_tool("quickstart").main(argv + opts)

    out = capsys.readouterr().out
    # The first line says which precision this CPU trains in, and why; the last ones, the speed it had.
    assert out.lstrip().startswith("Precision: float32: no bfloat16 units on this CPU (AVX2; "), out
    trained = re.search(r"Trained (\d+) iterations in ([\d.]+) min \(([\d.]+) s/iteration, (\d+) threads, (\w+)\)", out)
    assert trained, out
    assert trained.group(1) == "3"
    assert float(trained.group(3)) > 0
    assert trained.group(5) == "float32"
    assert f"Box AP on qs_val: {results['bbox']['AP']:.1f}" in out
    assert (output / "model_final.pth").is_file()
    drawn = sorted(p.name for p in (output / "predictions").iterdir())
    assert len(drawn) == 2 and all(name.endswith((".png", ".jpg")) for name in drawn)
