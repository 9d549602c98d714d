"""Checks of a config and its command-line overrides, so that a mistake fails early and says how to fix it: the
override keys of both config systems (a LazyConfig's ``key=value``, a yacs config's ``KEY VALUE``), then a
LazyConfig's datasets, files, weights, classes and schedule."""

import difflib
import functools
import inspect
import json
import math
import os
from typing import List, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..checkpoint import weights_to_load
from ..compat import has_compiled_ops
from ..data.checks import DatasetNotRegisteredError, check_registered, get_checked_dataset_dicts

__all__ = [
    "ConfigKeyError",
    "ConfigValueError",
    "PreflightError",
    "check_dataset_names",
    "check_schedule",
    "check_num_classes",
    "check_override_keys",
    "lazy_target",
    "preflight",
    "set_epoch_length",
    "use_available_coco_eval",
]


class ConfigKeyError(KeyError):
    def __str__(self):  # KeyError's own would show the message's repr
        return str(self.args[0])


class ConfigValueError(ValueError):
    """A config value that cannot make sense (a negative length, milestones out of order); names the key."""


class PreflightError(RuntimeError):
    """Files a run needs are missing or datasets are not registered: every problem found, each with its remedy."""


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


def _unknown_key(key: str, parts: List[str], depth: int, candidates: Sequence[str], more: str = "") -> ConfigKeyError:
    """The error for ``key``, whose part ``depth`` is none of ``candidates``, with the close matches."""
    part = parts[depth]
    matches = [".".join([*parts[:depth], m, *parts[depth + 1 :]]) for m in difflib.get_close_matches(part, candidates)]
    hint = f" Did you mean {' or '.join(matches)}?" if matches else ""
    return ConfigKeyError(
        f"Unknown config key '{key}': {'.'.join(parts[:depth]) or 'the config'} has no '{part}'.{hint}{more}"
    )


def _check_yacs_override_keys(cfg: CfgNode, opts: Sequence[str]) -> None:
    if len(opts) % 2 or any("=" in key for key in opts[::2]):
        raise ValueError(
            "Overrides of a YAML config are KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000 (KEY=VALUE is a LazyConfig's "
            f"form); got: {' '.join(opts)}"
        )
    for key in opts[::2]:
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            if not (isinstance(node, CfgNode) and part in node):
                raise _unknown_key(key, parts, depth, sorted(node) if isinstance(node, CfgNode) else [])
            node = node[part]


def check_override_keys(cfg, overrides: Sequence[str]) -> None:
    """Raises :class:`ConfigKeyError`, with close matches, for an override of a key that ``cfg`` does not have.

    For a yacs ``CfgNode`` (``KEY VALUE`` pairs; a ValueError, saying the form, for others), where yacs would fail an
    assertion. For a LazyConfig (``key=value``), where a key that is no argument of the object built there would be
    added silently: a misspelt ``train.max_iters`` is never read, and a misspelt ``model.hed.num_classes`` fails
    later in ``instantiate`` without a hint. New keys asked for with ``+key=value`` pass.
    """
    if isinstance(cfg, CfgNode):
        return _check_yacs_override_keys(cfg, overrides)
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
            more = f" Keys there: {', '.join(candidates)}. (Use +{key}=VALUE to add a new key.)"
            raise _unknown_key(key, parts, depth, candidates, more)


def _dataset_keys(cfg, eval_only: bool) -> List[str]:
    """The config keys of the datasets a run reads: the test set to evaluate, the training set (and the test set if
    it evaluates) to train."""
    keys = ["dataloader.test.dataset.names"] if eval_only else ["dataloader.train.dataset.names"]
    if not eval_only and "evaluator" in cfg.dataloader:
        keys.append("dataloader.test.dataset.names")
    return keys


def check_dataset_names(cfg, eval_only=False):
    """Raises, with the registered names, if a dataset the run reads is not registered."""
    for key in _dataset_keys(cfg, eval_only):
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


def use_available_coco_eval(cfg):
    """Turns COCOEvaluator's fast implementation (a compiled op) off where Detectron2's compiled ops are missing;
    pycocotools' evaluation gives the same numbers, slower."""
    if "evaluator" not in cfg.dataloader or has_compiled_ops():
        return
    target = lazy_target(cfg.dataloader.evaluator)
    if isinstance(target, type) and issubclass(target, COCOEvaluator):
        cfg.dataloader.evaluator.use_fast_impl = False


def _dataset_names(names) -> List[str]:
    return [names] if isinstance(names, str) else list(names)


def _missing_dataset_files(name: str) -> List[str]:
    """What the registered dataset ``name`` reads and lacks (its annotation file, its image folder), with the remedy."""
    metadata = MetadataCatalog.get(name)
    if metadata.get("generated_on_load", False):
        return []
    missing = [
        f"{what} {path}"
        for what, path in (("annotation file", metadata.get("json_file")), ("image folder", metadata.get("image_root")))
        if path and not os.path.exists(path)
    ]
    if not missing:
        return []
    remedy = "register your own data with --register-coco NAME JSON IMAGE_ROOT and use NAME in the dataset names"
    if name.startswith("coco_"):
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        remedy = (
            f"place COCO as Detectron2 expects it: {root}/coco/annotations/instances_{{train,val}}2017.json and the "
            f"images in {root}/coco/{{train,val}}2017/ (DETECTRON2_DATASETS, now {root!r}, is the folder holding "
            f"coco/), or {remedy}"
        )
    return [f"Dataset '{name}' needs the {' and the '.join(missing)}, which do not exist: {remedy}."]


def preflight(cfg, eval_only: bool = False, resume: bool = False, problems: Sequence[str] = ()) -> None:
    """Checks, before anything is built, that the run has what it reads: registered datasets, their files, and the
    weights of ``train.init_checkpoint`` (unless ``resume`` finds a checkpoint in ``train.output_dir``).

    Args:
        problems: found earlier by the caller (e.g. a dataset that could not be registered), reported with these.

    Raises:
        PreflightError: naming every missing dataset, file and weights file together, each with its remedy.
    """
    problems = list(problems)
    try:
        check_dataset_names(cfg, eval_only)
    except DatasetNotRegisteredError as e:
        problems.append(str(e))
    names = [n for key in _dataset_keys(cfg, eval_only) for n in _dataset_names(OmegaConf.select(cfg, key) or [])]
    for name in dict.fromkeys(names):  # each once, in order
        if name in DatasetCatalog.list():
            problems += _missing_dataset_files(name)
    try:
        weights_to_load(
            OmegaConf.select(cfg, "train.init_checkpoint", default=""),
            OmegaConf.select(cfg, "train.output_dir", default=""),
            resume=resume,
            training=not eval_only,
        )
    except FileNotFoundError as e:
        problems.append(str(e))
    if problems:
        raise PreflightError("The run cannot start:\n" + "\n".join(f"  * {p}" for p in problems))


def _positive(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigValueError(f"{key}={value!r}: it must be a positive number of iterations or images.")


def check_schedule(cfg) -> List[str]:
    """Checks the training schedule of ``cfg`` (after the overrides) and says what of it the run will not reach.

    Raises:
        ConfigValueError: naming the key, for a length that is not positive or milestones out of order.

    Returns:
        one sentence for each scheduled event at or past ``train.max_iter`` (an LR step, the switch from ATSS to
        task-aligned assignment, the end of the LR warm-up, a checkpoint or evaluation period), to log.
    """
    # The sources first: with train.iters_per_epoch=0, train.max_iter (12 epochs) is 0 too.
    for key in ("train.iters_per_epoch", "dataloader.train.total_batch_size", "train.max_iter"):
        _positive(cfg, key)
    max_iter = cfg.train.max_iter
    epoch = OmegaConf.select(cfg, "train.iters_per_epoch", default=None)

    def when(iteration):
        return f"iteration {iteration}" + (f", epoch {iteration / epoch:g}" if epoch else "")

    notes = []
    milestones = OmegaConf.select(cfg, "lr_multiplier.milestones", default=None)
    if milestones is not None:
        milestones = list(milestones)
        if any(not isinstance(m, int) or m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise ConfigValueError(
                f"lr_multiplier.milestones={milestones}: the LR steps must be positive iterations in increasing order."
            )
        notes += [
            f"The LR step at {when(m)} lies past train.max_iter={max_iter}: not reached."
            for m in milestones
            if m >= max_iter
        ]
        warmup = OmegaConf.select(cfg, "lr_multiplier.warmup_iters", default=None)
        if isinstance(warmup, int) and warmup - 1 > max_iter - 1:
            reached = 0.001 + 0.999 * (max_iter - 1) / max(warmup - 1, 1)
            notes.append(
                f"The run ends within the {warmup}-iteration LR warm-up (train.max_iter={max_iter}): the learning "
                f"rate reaches {reached:.3g} of optimizer.lr."
            )
    tal = OmegaConf.select(cfg, "model.tal_start_iter", default=None)
    if isinstance(tal, int):
        if tal < 0:
            raise ConfigValueError(f"model.tal_start_iter={tal}: it must be an iteration >= 0.")
        if tal >= max_iter:
            notes.append(
                f"The switch from ATSS to task-aligned assignment at {when(tal)} lies past train.max_iter={max_iter}: "
                "the whole run assigns with ATSS."
            )
    for key, what in (("train.checkpointer.period", "checkpoint"), ("train.eval_period", "evaluation")):
        period = OmegaConf.select(cfg, key, default=None)
        if isinstance(period, int) and period >= max_iter:
            notes.append(f"{key}={period} lies past train.max_iter={max_iter}: only the final {what} happens.")
    return notes


def _usable(annotation) -> bool:
    """A non-crowd annotation whose box has an area (the checks drop the others)."""
    box = annotation.get("bbox")
    return not annotation.get("iscrowd", 0) and isinstance(box, list) and len(box) == 4 and box[2] > 0 and box[3] > 0


@functools.lru_cache(maxsize=8)
def _count_json_images(json_file: str, modified: float, filter_empty: bool) -> int:
    """Images of a COCO annotation file (with ``filter_empty``: those with a usable box); cached per file version, so
    that the check before launching and each process's set-up read it once."""
    with open(json_file) as f:
        coco = json.load(f)
    if filter_empty:
        return len({a["image_id"] for a in coco.get("annotations", []) if _usable(a)})
    return len(coco.get("images", []))


def _count_training_images(names, filter_empty: bool) -> int:
    """Training images of the datasets ``names`` (with ``filter_empty``: those with a non-crowd box of some area),
    counted without building the dataset: from ``MetadataCatalog``'s ``num_train_images`` where a known dataset has
    it, from the COCO annotation file, or else from the loaded dataset."""
    total = 0
    for name in _dataset_names(names):
        metadata = MetadataCatalog.get(name)
        known, json_file = metadata.get("num_train_images"), metadata.get("json_file")
        if filter_empty and known is not None:
            total += known
        elif json_file and os.path.isfile(json_file):
            total += _count_json_images(json_file, os.path.getmtime(json_file), filter_empty)
        else:
            total += len(get_checked_dataset_dicts(name, filter_empty))
    return total


def set_epoch_length(cfg, overrides=()) -> Optional[str]:
    """Sets ``train.iters_per_epoch`` to ``ceil(training images / total batch)`` of the training set the config reads.

    For configs whose schedule counts epochs (configs/common/schedule.py): their ``train.iters_per_epoch`` is COCO's,
    and a user's own dataset or batch gets its own epoch length. The images are counted without building the dataset
    (``_count_training_images``). Nothing changes when the config has no such key or the command line sets it.
    Called before the config is saved with the run, so that the saved config holds the epoch length.

    Returns:
        what changed, to log once logging is set up; None when nothing did.
    """
    if "iters_per_epoch" not in cfg.train:
        return None
    if any(o.key_or_group == "train.iters_per_epoch" for o in _parse_overrides(overrides)):
        return None
    _positive(cfg, "dataloader.train.total_batch_size")
    dataset = cfg.dataloader.train.dataset
    num_images = _count_training_images(dataset.names, dataset.get("filter_empty", True))
    batch = cfg.dataloader.train.total_batch_size
    length = math.ceil(num_images / batch)
    if length == cfg.train.iters_per_epoch:
        return None
    message = (
        f"One epoch of {dataset.names} is ceil({num_images} images / batch {batch}) = {length} "
        f"iterations, not the config's {cfg.train.iters_per_epoch}: train.iters_per_epoch={length}, so the "
        "schedule's lengths (train.max_iter, LR steps, ATSS warm-up, checkpoints) count this dataset's epochs. Set "
        "train.iters_per_epoch on the command line to keep another value."
    )
    cfg.train.iters_per_epoch = length
    return message
