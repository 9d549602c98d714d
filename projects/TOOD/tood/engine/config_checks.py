"""Checks of a LazyConfig and its command-line overrides, so that a mistake fails early and says how to fix it."""

import difflib
import inspect
import math
from typing import Optional

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.checks import check_registered

__all__ = [
    "ConfigKeyError",
    "check_dataset_names",
    "check_num_classes",
    "check_override_keys",
    "has_compiled_ops",
    "lazy_target",
    "set_epoch_length",
    "use_available_coco_eval",
]


class ConfigKeyError(KeyError):
    def __str__(self):  # KeyError's own would show the message's repr
        return str(self.args[0])


def lazy_target(node):
    """The callable of a LazyCall node (its ``_target_``, located when the config was saved as text)."""
    target = node._target_
    return locate(target) if isinstance(target, str) else target


def _target_parameters(node):
    """Argument names of a LazyCall node's target, following ``**kwargs`` up a class's bases; None if it takes any
    or cannot be inspected."""
    if not isinstance(node, DictConfig) or node.get("_target_") is None:
        return []
    target = lazy_target(node)
    functions = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    names = []
    for function in functions:
        try:
            params = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _parse_overrides(overrides):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def check_override_keys(cfg, overrides):
    """Raises :class:`ConfigKeyError`, with close matches, for an override of a key that ``cfg`` does not have and
    that is no argument of the object built there.

    LazyConfig would add such a key silently: a misspelt ``train.max_iters`` is never read, and a misspelt
    ``model.hed.num_classes`` fails later in ``instantiate`` without a hint. New keys asked for with ``+key=value``
    pass.
    """
    for override in _parse_overrides(overrides):
        if override.is_add():
            continue
        key = override.key_or_group
        parts = key.split(".")
        node = cfg
        for depth, part in enumerate(parts):
            if isinstance(node, ListConfig):
                known = [str(i) for i in range(len(node))]
            else:
                known = [k for k in node.keys() if k != "_target_"]
            if part in known:
                child = node._get_node(int(part) if isinstance(node, ListConfig) else part)
                if not OmegaConf.is_config(child):
                    break  # a value, replaced by the override
                node = child
                continue
            params = _target_parameters(node)
            if params is None or part in params:
                break  # an argument the config leaves at its default
            candidates = sorted(set(known + params))
            matches = [
                ".".join([*parts[:depth], m, *parts[depth + 1 :]]) for m in difflib.get_close_matches(part, candidates)
            ]
            hint = f" Did you mean {' or '.join(matches)}?" if matches else ""
            raise ConfigKeyError(
                f"Unknown config key '{key}': {'.'.join(parts[:depth]) or 'the config'} has no '{part}'.{hint} "
                f"Keys there: {', '.join(candidates)}. (Use +{key}=VALUE to add a new key.)"
            )


def check_dataset_names(cfg, eval_only=False):
    """Raises, with the registered names, if a dataset the run reads is not registered."""
    keys = ["dataloader.test.dataset.names"] if eval_only else ["dataloader.train.dataset.names"]
    if not eval_only and "evaluator" in cfg.dataloader:
        keys.append("dataloader.test.dataset.names")
    for key in keys:
        names = OmegaConf.select(cfg, key, default=None)
        if names is not None:
            check_registered(names, key)


def check_num_classes(cfg, names):
    """Fails early, with the override to use, when the model's classes do not match the dataset's."""
    num_classes = cfg.model.get("num_classes")
    for name in [names] if isinstance(names, str) else names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if num_classes is not None and classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"Dataset '{name}' has {len(classes)} classes but model.num_classes={num_classes}: "
                f"add model.num_classes={len(classes)} to the command line."
            )


def has_compiled_ops() -> bool:
    """False when detectron2._C is the TOOD placeholder of a pure-Python detectron2 install."""
    from detectron2 import _C

    return not getattr(_C, "IS_TOOD_PLACEHOLDER", False)


def use_available_coco_eval(cfg):
    """Turns COCOEvaluator's fast implementation (a compiled op) off where Detectron2's compiled ops are missing;
    pycocotools' evaluation gives the same numbers, slower."""
    if "evaluator" not in cfg.dataloader or has_compiled_ops():
        return
    target = lazy_target(cfg.dataloader.evaluator)
    if isinstance(target, type) and issubclass(target, COCOEvaluator):
        cfg.dataloader.evaluator.use_fast_impl = False


def set_epoch_length(cfg, overrides=()) -> Optional[str]:
    """Sets ``train.iters_per_epoch`` to ``ceil(training images / total batch)`` of the training set the config reads.

    For configs whose schedule counts epochs (configs/common/schedule.py): their ``train.iters_per_epoch`` is COCO's,
    and a user's own dataset gets its own epoch length. Nothing changes when the config has no such key or the
    command line sets it. Called before the config is saved with the run.

    Returns:
        what changed, to log once logging is set up; None when nothing did.
    """
    if "iters_per_epoch" not in cfg.train:
        return None
    if any(o.key_or_group == "train.iters_per_epoch" for o in _parse_overrides(overrides)):
        return None
    num_images = len(instantiate(cfg.dataloader.train.dataset))
    batch = cfg.dataloader.train.total_batch_size
    length = math.ceil(num_images / batch)
    if length == cfg.train.iters_per_epoch:
        return None
    message = (
        f"One epoch of {cfg.dataloader.train.dataset.names} is ceil({num_images} images / batch {batch}) = {length} "
        f"iterations, not the config's {cfg.train.iters_per_epoch}: train.iters_per_epoch={length}, so the "
        "schedule's lengths (train.max_iter, LR steps, ATSS warm-up, checkpoints) count this dataset's epochs. Set "
        "train.iters_per_epoch on the command line to keep another value."
    )
    cfg.train.iters_per_epoch = length
    return message
