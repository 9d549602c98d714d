"""What a TOOD training or inference script needs; the tools in ``tools/`` parse arguments and call these.

* :mod:`.launcher`: ``main`` and ``launch_from_args``, what ``tools/train_net.py`` runs: the choice between the two
  flows below, and the processes.
* :mod:`.training`: the LazyConfig flow (``load_config``, ``setup``, ``do_train``, ``do_test``,
  ``evaluate_checkpoint``), as Detectron2's ``tools/lazyconfig_train_net.py``.
* :mod:`.defaults`: the YAML flow: :class:`Trainer`, Detectron2's ``DefaultTrainer`` for yacs configs, and
  ``main_yaml``.
* :mod:`.arguments`: the command line both flows read (``argument_parser``, the ``--register-coco`` datasets).
* :mod:`.train_loop`: the inner loops both flows use (finite-loss check, bfloat16 on CPU, gradient clipping), with
  their checkpointer.
* :mod:`.config_checks`: override keys of both config systems; a LazyConfig's datasets, weights, classes, schedule.
* ``launch``: Detectron2's, from :mod:`tood.compat` (where v0.6 also needs it for several CPU processes).
* :mod:`.predictor`, :mod:`.visualization`: single-image prediction and drawn detections.
* :mod:`.hooks`: a progress bar.

Weights are found, checked and loaded by :mod:`tood.checkpoint` (``weights_to_load``, ``load_weights``).
"""

from ..compat import launch
from .arguments import argument_parser
from .config_checks import ConfigKeyError
from .defaults import Trainer, main_yaml
from .hooks import ProgressBar
from .launcher import launch_from_args, main
from .predictor import LazyPredictor, dataset_metadata
from .train_loop import build_trainer, check_losses_finite
from .training import do_test, do_train, setup

__all__ = [
    "ConfigKeyError",
    "LazyPredictor",
    "ProgressBar",
    "Trainer",
    "argument_parser",
    "build_trainer",
    "check_losses_finite",
    "dataset_metadata",
    "do_test",
    "do_train",
    "launch",
    "launch_from_args",
    "main",
    "main_yaml",
    "setup",
]
