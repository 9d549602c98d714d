"""When a run goes wrong: wrong config keys, datasets and weights, interrupted checkpoints, non-finite losses and
resuming are either handled as documented or stopped with an error that says what to do."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase, hooks
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage
from torch import nn

from tests.conftest import REPO_ROOT, reregister_coco, write_tiny_lazy_config
from tood.checkpoint import TOODCheckpointer
from tood.data.checks import (
    DatasetNotRegisteredError,
)
from tood.engine.arguments import argument_parser
from tood.engine.config_checks import ConfigKeyError, check_dataset_names, check_override_keys
from tood.engine.train_loop import build_trainer
from tood.engine.training import do_train
from tood.losses import TOODLoss

QUICKSTART = str(REPO_ROOT / "configs" / "quickstart_shapes.py")
pytestmark = pytest.mark.usefixtures("one_thread")  # keeps these tests light next to other work


# --- configuration and weights -----------------------------------------------------------------------------


def test_unknown_override_key_suggests_close_matches():
    cfg = LazyConfig.load(QUICKSTART)
    with pytest.raises(ConfigKeyError) as e:
        check_override_keys(cfg, ["model.hed.num_classes=3"])
    assert "Unknown config key 'model.hed.num_classes': model has no 'hed'" in str(e.value)
    assert "Did you mean model.head.num_classes?" in str(e.value)
    with pytest.raises(ConfigKeyError, match="Did you mean train.max_iter?"):
        check_override_keys(cfg, ["train.max_iters=10"])
    # Arguments reached through **kwargs (CheckedDatasetMapper -> DatasetMapper) are known too.
    with pytest.raises(ConfigKeyError, match="Did you mean dataloader.train.mapper.on_bad_image?"):
        check_override_keys(cfg, ["dataloader.train.mapper.on_bad_imag=raise"])
    # Existing keys, list items, arguments left at their default, and keys added with "+".
    check_override_keys(
        cfg,
        [
            "train.max_iter=5",
            "dataloader.train.mapper.augmentations.0.short_edge_length=96",
            "dataloader.train.mapper.use_keypoint=False",
            "model.head.prior_prob=0.02",
            "+train.note=hello",
        ],
    )


def test_unregistered_dataset_lists_the_registered_ones():
    cfg = LazyConfig.load(QUICKSTART)
    cfg.dataloader.train.dataset.names = "tood_shapes_trian"
    with pytest.raises(DatasetNotRegisteredError) as e:
        check_dataset_names(cfg)
    message = str(e.value)
    assert "Dataset 'tood_shapes_trian' (dataloader.train.dataset.names) is not registered" in message
    assert "Did you mean 'tood_shapes_train'" in message and "--register-coco tood_shapes_trian" in message
    assert "Registered datasets: " in message and "tood_shapes_val" in message
    check_dataset_names(cfg, eval_only=True)  # evaluation reads the test set only


@pytest.fixture(scope="module")
def quickstart_model():
    def build(num_classes):
        cfg = LazyConfig.load(QUICKSTART)
        cfg.model.num_classes = num_classes
        return instantiate(cfg.model)

    return build


def test_checkpoint_of_other_classes_or_architecture_is_explained(quickstart_model, tmp_path, tood_log):
    TOODCheckpointer(quickstart_model(6), str(tmp_path)).save("six", iteration=9)
    path = str(tmp_path / "six.pth")
    model = quickstart_model(3)
    with pytest.raises(ValueError) as e:
        TOODCheckpointer(model, strict=True).load(path, checkpointables=[])
    message = str(e.value)
    assert f"Checkpoint {path} does not fit" in message
    assert "head.cls_score.weight: (6, 64, 3, 3) in the checkpoint, (3, 64, 3, 3) in the model" in message
    assert "predicts 6 classes" in message and "model.num_classes" in message
    # Resuming in a folder whose last checkpoint is of another model is refused too.
    with pytest.raises(ValueError, match="cls_score.bias: \\(6,\\) in the checkpoint"):
        TOODCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)

    # Initialising (fine-tuning to 3 classes): the rest is loaded, the classifier keeps its initialisation.
    before = model.head.cls_score.weight.detach().clone()
    TOODCheckpointer(model).resume_or_load(path, resume=False)
    assert torch.equal(model.head.cls_score.weight, before)
    saved = torch.load(path)["model"]
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, saved["backbone.bottom_up.stem.conv1.weight"])
    assert "keep their initialisation" in tood_log.text

    torch.save({"model": nn.Linear(3, 3).state_dict()}, tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="No tensor of .*linear.pth fits the model: it holds bias, weight"):
        TOODCheckpointer(model).resume_or_load(str(tmp_path / "linear.pth"), resume=False)


# --- checkpoints -------------------------------------------------------------------------------------------

KILLED_DURING_SAVE = """
import os, signal, sys
import torch
from torch import nn
from detectron2.checkpoint import DetectionCheckpointer
from tood.checkpoint import TOODCheckpointer

folder, kind = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Linear(64, 64)
checkpointer = (TOODCheckpointer if kind == "atomic" else DetectionCheckpointer)(model, folder)
checkpointer.save("model_final", iteration=1)

def save_and_die(obj, f):  # the process is killed half-way through writing the next checkpoint
    f.write(b"PK" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_and_die
with torch.no_grad():
    model.weight.add_(1)
checkpointer.save("model_final", iteration=2)
"""


@pytest.mark.parametrize("kind", ["atomic", "detectron2"])
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, kind):
    proc = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, str(tmp_path), kind], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "detectron2":
        # fvcore writes in place: the kill leaves a broken file where the good checkpoint was.
        with pytest.raises(Exception):  # noqa: B017  (whatever torch.load makes of the garbage)
            torch.load(tmp_path / "model_final.pth")
        return
    checkpointer = TOODCheckpointer(nn.Linear(64, 64), str(tmp_path))
    assert checkpointer.last_iteration() == 1
    checkpointer.resume_or_load("", resume=True)
    for k, v in checkpointer.model.state_dict().items():
        assert torch.equal(v, expected[k])
    partial = [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    assert len(partial) == 1 and partial[0].startswith(".model_final.pth.")
    checkpointer.save("model_0000003", iteration=3)  # the next save clears what the kill left
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth", "model_final.pth"]


def test_weights_with_nan_are_not_saved(tmp_path):
    model = nn.Linear(2, 2)
    checkpointer = TOODCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"weights hold NaN or inf \(bias\).*model_0000001.pth"):
        checkpointer.save("model_0000002", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


# --- training runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tiny_shapes, tmp_path_factory):
    """A config of the quick-start model on 8 generated images of 128 px, 2 per batch, no evaluation."""
    reregister_coco("reliability_train", tiny_shapes / "annotations.json", tiny_shapes / "images")
    extra = "del dataloader.evaluator\ntrain.max_iter = 6\ntrain.log_period = 1\ntrain.eval_period = 0\n"
    return write_tiny_lazy_config(tmp_path_factory.mktemp("tiny") / "tiny_config.py", "reliability_train", extra=extra)


class RecordSteps(HookBase):
    """Each iteration's raw losses and learning rate."""

    def __init__(self):
        self.losses, self.lrs = {}, {}

    def after_step(self):
        storage = self.trainer.storage
        self.losses[self.trainer.iter] = {k: storage.history(k).latest() for k in ("loss_cls", "loss_box_reg")}
        self.lrs[self.trainer.iter] = storage.history("lr").latest()


def _train(config, output_dir, *overrides, resume=False):
    args = argument_parser().parse_args(["--config-file", config] + (["--resume"] if resume else []))
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config), [f"train.output_dir={output_dir}", *overrides])
    seed_all_rng(0)
    record = RecordSteps()
    do_train(args, cfg, extra_hooks=[record])
    return record


@pytest.mark.slow
def test_nan_loss_stops_with_iteration_losses_and_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    forward = TOODLoss.forward

    def nan_at_iteration_4(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        if get_event_storage().iter == 4:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(TOODLoss, "forward", nan_at_iteration_4)
    with pytest.raises(FloatingPointError) as e:
        _train(tiny_config, tmp_path, "train.checkpointer.period=3")
    message, last = str(e.value), str(tmp_path / "model_0000002.pth")
    assert "Loss is NaN or infinite at iteration 4 (loss_cls=nan, loss_box_reg=" in message
    assert f"The last good checkpoint is {last}: continue from it with --resume" in message
    assert (
        not (tmp_path / "model_final.pth").exists()
        and (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    )

    monkeypatch.setattr(TOODLoss, "forward", forward)
    resumed = _train(tiny_config, tmp_path, "train.checkpointer.period=3", resume=True)
    assert sorted(resumed.losses) == [3, 4, 5]
    assert all(math.isfinite(v) for step in resumed.losses.values() for v in step.values())
    final = torch.load(tmp_path / "model_final.pth")
    assert final["iteration"] == 5 and all(torch.isfinite(v).all() for v in final["model"].values())


@pytest.mark.slow
def test_resumed_run_continues_like_the_uninterrupted_one(tiny_config, tmp_path, tood_log):
    """Resumed from iteration 0's checkpoint (as after a kill): the same data, losses, learning rates, warm-up
    phase (ATSS for iterations 0-1, then TAL) and final weights as the run that was never stopped."""
    full = _train(tiny_config, tmp_path / "full", "train.checkpointer.period=1")
    (tmp_path / "resumed").mkdir()
    os.link(tmp_path / "full" / "model_0000000.pth", tmp_path / "resumed" / "model_0000000.pth")
    (tmp_path / "resumed" / "last_checkpoint").write_text("model_0000000.pth")
    tood_log.clear()
    resumed = _train(tiny_config, tmp_path / "resumed", "train.checkpointer.period=1", resume=True)

    assert sorted(resumed.losses) == [1, 2, 3, 4, 5]
    for i in range(1, 6):
        assert resumed.lrs[i] == full.lrs[i]
        for k, v in resumed.losses[i].items():
            assert v == pytest.approx(full.losses[i][k], rel=1e-5, abs=1e-7), (i, k)
    assert "Iteration 1: ATSS warm-up until iteration 2" in tood_log.text
    assert "Iteration 2: task-aligned assignment" in tood_log.text
    weights = [torch.load(tmp_path / run / "model_final.pth")["model"] for run in ("full", "resumed")]
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x):
        return {"loss": (self.linear(x).float() - 1).pow(2).mean()}


def test_absurd_learning_rate_stops_at_the_first_nonfinite_loss():
    """A toy regression with lr 1e25 (float32 and bfloat16 autocast): the step that overflows is never taken."""
    for amp in (False, True):
        model = _Regression()
        trainer = build_trainer(
            model, [torch.ones(4, 8)] * 10, torch.optim.SGD(model.parameters(), lr=1e25), amp=amp, device="cpu"
        )
        with pytest.raises(FloatingPointError, match=r"Loss is NaN or infinite at iteration [1-9] \(loss=") as e:
            trainer.train(0, 10)
        assert "No checkpoint was written yet" in str(e.value)


def test_nan_in_the_last_iteration_writes_no_final_checkpoint(tmp_path):
    """A run that fails in its last iteration did not finish: no model_final, last_checkpoint stays on a good one."""
    model = _Regression()
    data = [torch.ones(4, 8)] * 3 + [torch.full((4, 8), float("nan"))]
    trainer = build_trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.checkpointer = TOODCheckpointer(model, str(tmp_path))
    trainer.register_hooks([hooks.PeriodicCheckpointer(trainer.checkpointer, period=2, max_iter=4)])
    with pytest.raises(FloatingPointError, match=f"iteration 3 .*{tmp_path / 'model_0000001.pth'}"):
        trainer.train(0, 4)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
