"""What ``tools/train_net.py`` runs: the choice between the two config systems' flows, made here once, above both
(LazyConfig: :mod:`.training`, as Detectron2's ``tools/lazyconfig_train_net.py``; yacs YAML: :mod:`.defaults`, as its
``tools/train_net.py``), and the launch of the processes that run it."""

from datetime import timedelta

import yaml
from detectron2.utils.file_io import PathManager

from ..compat import launch
from .config_checks import ConfigKeyError, ConfigValueError, PreflightError
from .defaults import main_yaml
from .training import do_train, evaluate_checkpoint, load_config, setup

__all__ = ["is_yacs_config", "launch_from_args", "main"]


def is_yacs_config(path: str) -> bool:
    """Whether ``path`` is a YAML config of Detectron2's yacs system (upper-case keys: ``MODEL``, ``_BASE_``, ...)
    rather than a LazyConfig (a ``.py`` file, or the ``config.yaml`` that a LazyConfig run saves)."""
    if not path.endswith((".yaml", ".yml")):
        return False
    with PathManager.open(path) as f:
        # The node tree only: a LazyConfig's YAML may hold Python objects, which are not built here.
        root = yaml.compose(f, Loader=yaml.SafeLoader)
    return isinstance(root, yaml.MappingNode) and any(key.value.isupper() for key, _ in root.value)


def main(args):
    """``tools/train_net.py`` in each process: trains, or with ``--eval-only`` evaluates, the model of
    ``args.config_file``: a LazyConfig with :func:`~.training.setup` and :func:`~.training.do_train` or
    :func:`~.training.evaluate_checkpoint`, a YAML config with :func:`~.defaults.main_yaml`."""
    if is_yacs_config(args.config_file):
        return main_yaml(args)
    cfg = setup(args)
    return evaluate_checkpoint(args, cfg) if args.eval_only else do_train(args, cfg)


def launch_from_args(main_func, args):
    """Runs ``main_func(args)`` in the processes that ``--num-gpus``, ``--num-machines`` etc. ask for.

    A LazyConfig run is checked here first, once (:func:`~.training.load_config`): a run that cannot start (missing
    data or weights, an unknown key, a schedule that makes no sense) ends with its reasons and remedies, without a
    traceback, before any process starts.
    """
    if not is_yacs_config(args.config_file):
        try:
            load_config(args)
        except (PreflightError, ConfigKeyError, ConfigValueError) as e:
            raise SystemExit(f"error: {e}") from None
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timedelta(seconds=args.dist_timeout),
    )
