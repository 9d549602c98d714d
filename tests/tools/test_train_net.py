"""tools/train_net.py on CPU with a tiny generated dataset registered through --register-coco: training with
periodic checkpoints and evaluation, the ATSS -> TAL switch in the log, --resume, --eval-only, bfloat16 AMP,
gradient clipping, and 2-process DDP (gloo) reproducing the 1-process losses."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from torch import nn

from tests.conftest import REPO_ROOT, register_coco_args, write_tiny_lazy_config
from tood.data import get_shapes_dataset
from tood.engine.arguments import register_coco_datasets
from tood.engine.config_checks import check_num_classes
from tood.engine.train_loop import CheckedAMPTrainer, add_gradient_clipping, build_trainer

# On the quick-start model at 128 px (no flips: one and two processes see the same pixels).
TINY_CONFIG = """
# A few iterations leave every score under the usual 0.05: keep all candidates, so that AP is a number.
model.test_score_thresh = 0.0
train.max_iter = 6
train.log_period = 1
train.seed = 0
# float32 on every CPU: one and two processes are compared to 1e-3, beyond bfloat16's rounding.
train.amp.enabled = False
"""


@pytest.fixture(scope="module")
def tiny(tiny_shapes, tmp_path_factory):
    """(config file, --register-coco arguments) of the tiny setup."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_config.py"
    config = write_tiny_lazy_config(path, "tiny_train", "tiny_val", TINY_CONFIG)
    return config, register_coco_args(tiny_shapes, "tiny_train", "tiny_val")


def train_net_command(tiny, *args):
    """The command line of tools/train_net.py on the tiny setup with ``args`` (flags first, then key=value
    overrides)."""
    config, register = tiny
    return [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", config, *register, *args]


def run_train_net(tiny, *args):
    """Runs :func:`train_net_command` and returns its output; fails the test if the run fails."""
    proc = subprocess.run(train_net_command(tiny, *args), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def losses_by_iter(metrics):
    return {m["iteration"]: m for m in metrics if "total_loss" in m}


@pytest.mark.slow
def test_train_checkpoint_evaluate_resume_and_eval_only(tiny, tmp_path):
    out = tmp_path / "run"
    common = [f"train.output_dir={out}", "train.checkpointer.period=3", "train.eval_period=4"]
    log = run_train_net(tiny, *common, "train.clip_grad.enabled=True", "train.clip_grad.max_norm=1.0")

    metrics = read_metrics(out)
    steps = losses_by_iter(metrics)
    assert sorted(steps) == list(range(6))
    assert all(math.isfinite(steps[i][k]) for i in steps for k in ("total_loss", "loss_cls", "loss_box_reg"))
    # Gradient clipping logs the norm it clipped.
    assert all(steps[i]["grad_norm"] > 0 for i in steps)
    # Evaluated after iteration 3 (eval_period) and at the end.
    assert len([m for m in metrics if "bbox/AP" in m]) == 2
    files = set(os.listdir(out))
    assert {"model_0000002.pth", "model_0000005.pth", "model_final.pth", "config.yaml", "log.txt"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert "eta:" in log
    # 6 * 4 // 12 = 2: ATSS warm-up for iterations 0-1, then task-aligned assignment.
    assert re.search(r"Iteration 0:.*ATSS", log) and re.search(r"Iteration 2:.*task-aligned", log)

    # Resume from the checkpoint of iteration 2, as after a crash.
    (out / "last_checkpoint").write_text("model_0000002.pth")
    os.rename(out / "metrics.json", out / "metrics_first.json")
    log = run_train_net(tiny, "--resume", *common)
    assert "Starting training from iteration 3" in log
    assert "The training data continues at batch 3 of its stream" in log
    assert re.search(r"Iteration 3:.*task-aligned", log)
    resumed = losses_by_iter(read_metrics(out))
    assert sorted(resumed) == [3, 4, 5]
    assert [resumed[i]["lr"] for i in (3, 4, 5)] == [steps[i]["lr"] for i in (3, 4, 5)]
    assert steps[5]["lr"] < steps[4]["lr"]  # a step of the schedule falls inside the resumed part
    final_ap = [m for m in read_metrics(out) if "bbox/AP" in m][-1]["bbox/AP"]

    log = run_train_net(
        tiny, "--eval-only", f"train.output_dir={tmp_path / 'eval'}", f"train.init_checkpoint={out}/model_final.pth"
    )
    copypaste = re.findall(r"copypaste: ([0-9.]+),", log)
    assert math.isfinite(final_ap) and copypaste and float(copypaste[0]) == pytest.approx(final_ap, abs=1e-4)


@pytest.mark.slow
def test_bfloat16_amp_on_cpu(tiny, tmp_path):
    """train.amp.enabled=True trains in bfloat16 autocast, and says so: from the same weights and batch, the first
    step's losses differ from float32's by bfloat16's rounding (8 bits of mantissa: about 4e-3 per operation, a few
    percent through the network at most), neither more nor exactly nothing (autocast not applied)."""
    runs = {}
    for amp in (True, False):
        log = run_train_net(
            tiny, f"train.output_dir={tmp_path / str(amp)}", "train.max_iter=2", f"train.amp.enabled={amp}"
        )
        assert f"Training precision: {'bfloat16 autocast' if amp else 'float32'}: train.amp.enabled={amp}" in log
        runs[amp] = losses_by_iter(read_metrics(tmp_path / str(amp)))
    assert sorted(runs[True]) == [0, 1]
    for key in ("loss_cls", "loss_box_reg"):
        bf16, fp32 = runs[True][0][key], runs[False][0][key]
        assert 0 < abs(bf16 - fp32) <= 0.05 * fp32, (key, bf16, fp32)


@pytest.mark.slow
def test_two_cpu_processes_reproduce_one(tiny, tmp_path):
    """Same total batch (4), same seed: DDP over gloo logs the losses of a single process.

    The sampler's shuffled stream is split between ranks (ranks 0 and 1 take images 0, 2 and 1, 3 of a
    batch), the quick-start BN is synchronised across processes, and the losses' normalisers are averaged over
    ranks: the gradients are those of one process on the whole batch, up to float summation order. (metrics.json
    holds each loss as the median of its iterations so far: iteration 0 compares raw values, later ones medians
    of 2-4 iterations.)
    """
    common = ["train.max_iter=4", "dataloader.train.total_batch_size=4", "train.eval_period=0"]
    run_train_net(tiny, "--num-gpus", "1", *common, f"train.output_dir={tmp_path / 'one'}")
    run_train_net(tiny, "--num-gpus", "2", "--dist-url", "auto", *common, f"train.output_dir={tmp_path / 'two'}")
    one, two = losses_by_iter(read_metrics(tmp_path / "one")), losses_by_iter(read_metrics(tmp_path / "two"))
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for i in range(4):
        for key in ("loss_cls", "loss_box_reg"):
            assert two[i][key] == pytest.approx(one[i][key], rel=1e-3), (i, key)


def test_cpu_amp_trainer_runs_the_forward_in_bfloat16():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.dtypes = []

        def forward(self, data):
            out = self.linear(data)
            self.dtypes.append(out.dtype)
            return {"loss": out.float().pow(2).mean()}

    model = Recorder()
    trainer = build_trainer(
        model, [torch.ones(2, 4)] * 2, torch.optim.SGD(model.parameters(), lr=0.1), amp=True, device="cpu"
    )
    assert isinstance(trainer, CheckedAMPTrainer) and not trainer.grad_scaler.is_enabled()
    before = model.linear.weight.detach().clone()
    trainer.train(0, 2)
    assert model.dtypes == [torch.bfloat16] * 2
    assert model.linear.weight.dtype == torch.float32 and not torch.equal(model.linear.weight, before)


def test_gradient_clipping_clips_the_global_norm():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    optimizer = add_gradient_clipping(torch.optim.SGD(params, lr=1.0), max_norm=2.0)
    params[0].grad = torch.full((3,), 3.0)
    params[1].grad = torch.full((4,), 4.0)
    with EventStorage(0) as storage:
        optimizer.step()
    norm = math.sqrt(3 * 9 + 4 * 16)
    assert storage.history("grad_norm").latest() == pytest.approx(norm)
    # SGD with lr 1 stepped by the gradients scaled to norm 2, all by the same factor.
    torch.testing.assert_close(params[0].detach(), torch.full((3,), -3.0 * 2.0 / norm))
    torch.testing.assert_close(params[1].detach(), torch.full((4,), -4.0 * 2.0 / norm))


def test_registered_dataset_must_match_num_classes(tmp_path):
    folder = get_shapes_dataset(num_images=2, seed=0, image_size=64, root=tmp_path)
    register_coco_datasets([("two_shapes", str(folder / "annotations.json"), str(folder / "images"))])
    DatasetCatalog.get("two_shapes")  # loading a COCO json sets its thing_classes
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "quickstart_shapes.py"))
    check_num_classes(cfg, "two_shapes")
    cfg.model.num_classes = 80
    with pytest.raises(ValueError, match="model.num_classes=6"):
        check_num_classes(cfg, ["two_shapes"])
