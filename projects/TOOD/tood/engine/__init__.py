"""What a TOOD training or inference script needs; the tools in ``tools/`` parse arguments and call these.

* :mod:`.training`: LazyConfig training and evaluation (``setup``, ``do_train``, ``do_test``, ``main``).
* :mod:`.defaults`: :class:`Trainer`, Detectron2's ``DefaultTrainer`` for YAML configs, and ``main_yaml``, the
  YAML side of ``main``.
* :mod:`.train_loop`: the inner loops both use (finite-loss check, bfloat16 on CPU, gradient clipping).
* :mod:`.config_checks`: override keys, dataset names, classes, epoch length.
* ``launch``: Detectron2's, from :mod:`tood.compat` (where v0.6 also needs it for several CPU processes).
* :mod:`.predictor`, :mod:`.visualization`: single-image prediction and drawn detections.
* :mod:`.hooks`: a progress bar.
* :mod:`.benchmark`: timing and peak memory of a callable.
"""

from ..compat import launch
from .config_checks import ConfigKeyError
from .defaults import Trainer, main_yaml
from .hooks import ProgressBar
from .predictor import LazyPredictor, dataset_metadata
from .train_loop import build_trainer, check_losses_finite
from .training import argument_parser, do_test, do_train, launch_from_args, main, setup

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
