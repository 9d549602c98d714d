"""Training and evaluation from a LazyConfig: what Detectron2's ``tools/lazyconfig_train_net.py`` does, plus TOOD's
options and checks. ``tools/train_net.py`` reaches these through :mod:`tood.engine.launcher`.

Config keys beyond Detectron2's ``common/train.py`` (configs/common/train.py):

* ``train.amp.enabled``: mixed precision (:class:`~tood.engine.train_loop.CheckedAMPTrainer`): on CUDA fp16 + loss
  scaling, as Detectron2's AMPTrainer, on CPU bfloat16 autocast; None chooses by the CPU
  (:func:`~tood.precision.choose_precision`: bfloat16 where it has bfloat16 units, float32 elsewhere), for
  training and, on CPU, for evaluation unless ``--precision`` says otherwise.
* ``train.clip_grad``: ``enabled``, ``max_norm``, ``norm_type``: clip the global gradient norm before each step
  and log it as ``grad_norm``.
* ``train.device``: "cuda" or "cpu". Without CUDA, ``--num-gpus N`` starts N CPU processes (DDP over gloo).
* ``train.iters_per_epoch``: for schedules counted in epochs, set from the training set (:func:`set_epoch_length`).

When things go wrong: an override of a key the config does not have, or a dataset that is not registered, is an
error with close matches; missing weights name the file and the ways forward; a NaN or infinite loss stops training,
on every rank, before the step is applied, naming the iteration, the losses and the last good checkpoint;
checkpoints are written atomically and ``--resume`` continues the iteration, optimizer, LR schedule, warm-up phase
and data stream.
"""

import inspect
import logging

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import last_checkpoint, load_trained_model, load_weights, saved_iteration
from ..precision import choose_inference_precision, choose_precision, inference_autocast
from .arguments import register_coco_datasets
from .config_checks import (
    check_num_classes,
    check_override_keys,
    check_schedule,
    lazy_target,
    preflight,
    set_epoch_length,
    use_available_coco_eval,
)
from .train_loop import add_gradient_clipping, build_trainer

__all__ = [
    "do_test",
    "do_train",
    "evaluate_checkpoint",
    "load_config",
    "scale_learning_rate",
    "setup",
]

logger = logging.getLogger("detectron2")


def load_config(args, configure=None):
    """The run's LazyConfig, checked: ``--register-coco`` datasets registered, overrides applied to known keys, then
    (before anything heavy is built) the datasets, their files and the weights checked together, the epoch length
    counted, the learning rate scaled if asked, the schedule checked.

    Args:
        configure: optional callable that edits the config after the overrides, before it is checked (what a
            ``key=value`` override cannot say, e.g. another optimizer class).

    Returns:
        ``(cfg, notes)``: the config, and what to log about it once logging is set up.

    Raises:
        PreflightError, ConfigKeyError, ConfigValueError: a run that cannot start, with every reason and remedy.
    """
    problems = []
    try:
        register_coco_datasets(args.register_coco)
    except (FileNotFoundError, NotADirectoryError) as e:
        problems.append(str(e))
    cfg = LazyConfig.load(args.config_file)
    check_override_keys(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if configure is not None:
        configure(cfg)
    preflight(cfg, args.eval_only, args.resume, problems)
    use_available_coco_eval(cfg)
    if args.eval_only:
        return cfg, []
    notes = [set_epoch_length(cfg, args.opts), scale_learning_rate(cfg)]
    return cfg, [n for n in notes if n] + check_schedule(cfg)


def scale_learning_rate(cfg):
    """With ``train.reference_batch_size`` set (the batch that ``optimizer.lr`` is for, 16 in the zoo), scales the
    learning rate linearly to ``dataloader.train.total_batch_size`` (Goyal et al.'s rule, as mmdetection's
    ``auto_scale_lr``). The schedule's lengths need no change: they count epochs of the actual batch."""
    reference = cfg.train.get("reference_batch_size")
    batch = cfg.dataloader.train.total_batch_size
    if not reference or reference == batch:
        return None
    lr = cfg.optimizer.lr
    cfg.optimizer.lr = lr * batch / reference
    cfg.train.reference_batch_size = batch  # the saved config's optimizer.lr is for this batch now
    return f"optimizer.lr {lr:g} is for a total batch of {reference}: scaled to {cfg.optimizer.lr:g} for batch {batch}."


def setup(args, configure=None):
    """:func:`load_config`, then Detectron2's ``default_setup`` (saves the config with the run) and logging."""
    cfg, notes = load_config(args, configure)
    default_setup(cfg, args)
    # TOOD's modules log under "tood", e.g. the iteration where training switches from ATSS to TAL.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="tood")
    for note in notes:
        logger.warning(note)
    return cfg


def do_test(cfg, model, precision=None):
    """Evaluates ``model`` with ``dataloader.evaluator`` on ``dataloader.test``; {} without an evaluator.

    Args:
        precision: "auto", "fp32" or "bf16" (``--precision``); None: as training chose
            (:func:`~tood.precision.choose_inference_precision`).
    """
    if "evaluator" not in cfg.dataloader:
        return {}
    # The loader first: a generated dataset writes the json the evaluator reads when it is first loaded.
    data_loader = instantiate(cfg.dataloader.test)
    bf16, why = choose_inference_precision(precision, cfg.train.amp.get("enabled"), cfg.train.device)
    logger.info(f"Evaluation precision: {why}")
    with inference_autocast(bf16, cfg.train.device):
        results = inference_on_dataset(model, data_loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def _continue_data_stream(cfg, start_iter):
    """Makes the train loader start its sample stream at batch ``start_iter`` when its builder can."""
    target = lazy_target(cfg.dataloader.train)
    if "start_iter" in inspect.signature(target).parameters:
        cfg.dataloader.train.start_iter = start_iter
        logger.info(f"The training data continues at batch {start_iter} of its stream.")
    else:
        logger.warning(
            f"{getattr(target, '__name__', target)} takes no start_iter: the resumed run reads its images from the "
            "start of the data stream again (tood.data.loader.build_train_loader continues it)."
        )


def do_train(args, cfg, extra_hooks=()):
    """Trains ``cfg.model`` (Detectron2's ``lazyconfig_train_net.do_train`` with TOOD's options).

    Args:
        extra_hooks: more :class:`HookBase` to run, before the writers.

    Returns:
        dict: the results of the last evaluation (empty without ``dataloader.evaluator``).
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    if cfg.train.clip_grad.enabled:
        add_gradient_clipping(optimizer, cfg.train.clip_grad.max_norm, cfg.train.clip_grad.norm_type)

    resumed = last_checkpoint(cfg.train.output_dir) if args.resume else ""
    if resumed:
        _continue_data_stream(cfg, saved_iteration(resumed) + 1)
    train_loader = instantiate(cfg.dataloader.train)
    check_num_classes(cfg, cfg.dataloader.train.dataset.names)

    ddp = dict(cfg.train.ddp)
    if torch.device(cfg.train.device).type == "cpu":
        ddp["device_ids"] = None  # DDP's CPU mode; Detectron2 would name the local GPU
    model = create_ddp_model(model, **ddp)
    amp, precision = choose_precision(cfg.train.amp.get("enabled"), cfg.train.device)
    logger.info(f"Training precision: {precision}")
    trainer = build_trainer(
        model, train_loader, optimizer, amp=amp, device=cfg.train.device, output_dir=cfg.train.output_dir
    )
    checkpointer = trainer.checkpointer

    last_results = {}

    def evaluate():
        last_results.clear()
        last_results.update(do_test(cfg, model, args.precision))
        return last_results

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            *extra_hooks,
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )

    resuming = load_weights(checkpointer, cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that had just finished.
    start_iter = trainer.iter + 1 if resuming else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def evaluate_checkpoint(args, cfg):
    """``--eval-only``: the model with ``train.init_checkpoint`` (or, with ``--resume``, the last checkpoint of
    ``train.output_dir``), which must fit it exactly, evaluated."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    load_trained_model(model, cfg.train.init_checkpoint, save_dir=cfg.train.output_dir, resume=args.resume)
    return do_test(cfg, model, args.precision)
