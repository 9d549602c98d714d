"""The one way a job finds, checks and loads its weights (tood.checkpoint): which file each job kind loads, the
check that names a missing file, strict loading for evaluation and prediction, resuming with the trainer's state,
and the training checkpointer that ``build_trainer`` gives the inner loop."""

import itertools

import pytest
import torch
from torch import nn

from tood.checkpoint import TOODCheckpointer, load_trained_model, load_weights, weights_to_load
from tood.engine.train_loop import build_trainer


def _saved(folder, name, model, iteration=3, **extra):
    TOODCheckpointer(model, str(folder), **extra).save(name, iteration=iteration)
    return str(folder / f"{name}.pth")


def test_which_file_each_job_starts_from(tmp_path):
    weights = _saved(tmp_path / "pretrained", "weights", nn.Linear(2, 2))
    run = tmp_path / "run"
    # Nothing to resume yet: the given weights, for training and for evaluation alike.
    assert weights_to_load(weights, str(run), resume=True) == weights
    assert weights_to_load(weights, str(run), resume=False, training=False) == weights
    assert weights_to_load("", str(run)) == ""  # no weights: from scratch
    last = _saved(run, "model_0000004", nn.Linear(2, 2))
    assert weights_to_load(weights, str(run), resume=True) == last
    assert weights_to_load(weights, str(run), resume=False) == weights
    # Resuming a run does not need the weights it started from any more.
    assert weights_to_load(str(tmp_path / "gone.pth"), str(run), resume=True) == last


@pytest.mark.parametrize(
    "training, advice", [(True, "convert_torchvision_resnet.py"), (False, "point MODEL.WEIGHTS at a trained model")]
)
def test_a_missing_file_is_named_with_the_job_s_advice(tmp_path, training, advice):
    missing = str(tmp_path / "nowhere.pkl")
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS={missing} does not exist") as e:
        weights_to_load(missing, str(tmp_path), training=training, key="MODEL.WEIGHTS")
    assert advice in str(e.value)
    # Loading goes through the same check: a strict (evaluating) checkpointer gets the evaluation advice.
    with pytest.raises(FileNotFoundError, match=advice):
        load_weights(TOODCheckpointer(nn.Linear(2, 2), strict=not training), missing, key="MODEL.WEIGHTS")


def test_training_keeps_what_does_not_fit_and_evaluation_refuses_it(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    path = _saved(tmp_path, "three", source)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 5))  # another number of outputs, as other classes
    before = model[1].weight.detach().clone()
    assert load_weights(TOODCheckpointer(model), path) is False
    assert torch.equal(model[0].weight, source[0].weight) and torch.equal(model[1].weight, before)
    with pytest.raises(ValueError, match=r"1.weight: \(3, 2\) in the checkpoint, \(5, 2\) in the model"):
        load_trained_model(model, path)
    fitting = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    load_trained_model(fitting, path)
    assert all(torch.equal(a, b) for a, b in zip(fitting.state_dict().values(), source.state_dict().values()))


def test_resuming_restores_the_trainer_state_and_evaluation_takes_the_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = itertools.repeat([torch.randn(4)])
    trainer = build_trainer(_LossOf(model), data, optimizer, output_dir=str(tmp_path))
    assert trainer.checkpointer.checkpointables == {"trainer": trainer}  # the trainer's own state by default
    trainer.iter = 6
    trainer.checkpointer.save("model_0000006", iteration=6)
    initial = _saved(tmp_path / "init", "init", _LossOf(nn.Linear(4, 2)))

    again = build_trainer(_LossOf(nn.Linear(4, 2)), data, torch.optim.SGD(model.parameters(), lr=0.1))
    assert again.checkpointer is None  # no output folder: no checkpointer
    again = build_trainer(_LossOf(nn.Linear(4, 2)), data, optimizer, output_dir=str(tmp_path))
    assert load_weights(again.checkpointer, initial, resume=True) is True
    assert again.iter == 6 and torch.equal(again.model.linear.weight, model.weight)

    evaluated = _LossOf(nn.Linear(4, 2))
    load_trained_model(evaluated, initial, save_dir=str(tmp_path), resume=True)
    assert torch.equal(evaluated.linear.weight, model.weight)
    load_trained_model(evaluated, initial, save_dir=str(tmp_path), resume=False)
    assert torch.equal(evaluated.linear.weight, torch.load(initial)["model"]["linear.weight"])


class _LossOf(nn.Module):
    """A model for the trainer: one loss from a linear layer."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, batch):
        return {"loss": self.linear(torch.stack(batch)).square().mean()}
