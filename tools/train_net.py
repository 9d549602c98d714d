#!/usr/bin/env python
"""Train and evaluate TOOD (or any Detectron2 model) described by a LazyConfig file.

Detectron2's tools/lazyconfig_train_net.py, plus what TOOD's configs use:

* ``train.amp.enabled``: mixed precision. On CUDA, Detectron2's AMPTrainer (fp16 autocast + loss scaling);
  on CPU, bfloat16 autocast (:class:`CPUAMPTrainer`; bfloat16 has float32's range, so no loss scaling).
* ``train.clip_grad``: ``enabled``, ``max_norm``, ``norm_type``: clip the global gradient norm before each
  optimizer step (after AMP's unscaling) and log it as ``grad_norm``.
* ``train.device``: "cuda" or "cpu". Without CUDA, ``--num-gpus N`` starts N CPU processes (DDP over gloo).
* Evaluation every ``train.eval_period`` iterations and at the end; COCOEvaluator's fast implementation only
  where Detectron2's compiled ops exist (pycocotools' COCOeval otherwise).
* ``--register-coco NAME JSON IMAGE_ROOT`` (repeatable) registers a COCO-format dataset before the config is
  built, so ``dataloader.train.dataset.names=NAME`` needs no code; the json is checked when first loaded.
* The ``tood`` logger (ATSS warm-up -> task-aligned assignment switch) goes to the console and log.txt.
* When things go wrong: an override of a key the config does not have, or a dataset that is not registered, is an
  error with close matches; a NaN or infinite loss stops training, on every rank, before the step is applied, naming
  the iteration, the losses and the last good checkpoint; checkpoints are written atomically and ``--resume``
  continues the iteration, optimizer, LR schedule, warm-up phase and data stream; with several processes, a worker
  that fails ends the run, and one that hangs ends it after ``--dist-timeout`` seconds.

Examples::

    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8
    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8 --resume
    tools/train_net.py --config-file configs/tood_R_50_1x.py --eval-only train.init_checkpoint=model_final.pth
    tools/train_net.py --config-file configs/quickstart_shapes.py \\
        --register-coco mine_train mine/train.json mine/images --register-coco mine_val mine/val.json mine/images \\
        dataloader.train.dataset.names=mine_train dataloader.test.dataset.names=mine_val model.num_classes=3
"""

import difflib
import inspect
import logging
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
)
from detectron2.engine import launch as d2_launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets
from tood.checkpoint import TOODCheckpointer
from tood.data.checks import check_registered, register_checked_coco

logger = logging.getLogger("detectron2")


def register_coco_datasets(specs):
    """Registers each ``(name, json_file, image_root)`` as a COCO instances dataset (``--register-coco``)."""
    for name, json_file, image_root in specs or ():
        register_checked_coco(name, json_file, image_root)


class ConfigKeyError(KeyError):
    def __str__(self):  # KeyError's own would show the message's repr
        return str(self.args[0])


def _target_parameters(node):
    """Argument names of a LazyCall node's target, following ``**kwargs`` up a class's bases; None if it takes any
    or cannot be inspected."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target is None:
        return []
    target = locate(target) if isinstance(target, str) else target
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


def check_override_keys(cfg, overrides):
    """Raises :class:`ConfigKeyError`, with close matches, for an override of a key that ``cfg`` does not have and
    that is no argument of the object built there.

    LazyConfig would add such a key silently: a misspelt ``train.max_iters`` is never read, and a misspelt
    ``model.hed.num_classes`` fails later in ``instantiate`` without a hint. New keys asked for with ``+key=value``
    pass.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
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


def has_compiled_ops() -> bool:
    """False when detectron2._C is the TOOD placeholder of a pure-Python detectron2 install."""
    from detectron2 import _C

    return not getattr(_C, "IS_TOOD_PLACEHOLDER", False)


def _use_available_coco_eval(cfg):
    # The fast COCOeval is a compiled op; pycocotools' gives the same numbers, slower.
    if "evaluator" not in cfg.dataloader or has_compiled_ops():
        return
    target = cfg.dataloader.evaluator._target_
    target = locate(target) if isinstance(target, str) else target
    if isinstance(target, type) and issubclass(target, COCOEvaluator):
        cfg.dataloader.evaluator.use_fast_impl = False


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


def check_losses_finite(loss_dict, iteration, checkpointer=None):
    """Raises FloatingPointError, on every rank, if a loss of any rank is NaN or infinite.

    Called before the optimizer step, so the weights never take a non-finite step. The message names the
    iteration, each rank's losses and the last good checkpoint. The ranks agree through an all-reduce, so that
    none goes on to wait for the others in the next collective.
    """
    bad = torch.stack([~torch.isfinite(v.detach()).all() for v in loss_dict.values()]).any().float()
    if comm.get_world_size() > 1:
        dist.all_reduce(bad)
    if not bad.item():
        return
    losses = [", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())]
    if comm.get_world_size() > 1:
        losses = [f"rank {r}: {x}" for r, x in enumerate(comm.all_gather(losses[0]))]
    if checkpointer is not None and checkpointer.has_checkpoint():
        last = f"The last good checkpoint is {checkpointer.get_checkpoint_file()}: continue from it with --resume"
    else:
        last = "No checkpoint was written yet: start again"
    raise FloatingPointError(
        f"Loss is NaN or infinite at iteration {iteration} ({'; '.join(losses)}); the weights did not take this "
        f"step. {last}, with e.g. a lower optimizer.lr, a longer lr_multiplier.warmup_length or "
        "train.clip_grad.enabled=True."
    )


class FiniteLossCheck:
    """Trainer mixin: :func:`check_losses_finite` on every iteration, before the step.

    ``checkpointer`` (set by :func:`do_train`) is where the message looks for the last good checkpoint.
    """

    checkpointer = None

    def _write_metrics(self, loss_dict, data_time, prefix=""):
        # Called by the run_step of SimpleTrainer, AMPTrainer and CPUAMPTrainer before the optimizer step.
        try:
            check_losses_finite(loss_dict, self.iter, self.checkpointer)
        except FloatingPointError:
            # The last completed iteration: hooks' after_train reads iter + 1 >= max_iter as "training finished"
            # (final checkpoint, final evaluation), which a failure in the last iteration is not.
            self.iter -= 1
            raise
        super()._write_metrics(loss_dict, data_time, prefix)


class CheckedSimpleTrainer(FiniteLossCheck, SimpleTrainer):
    pass


class CheckedAMPTrainer(FiniteLossCheck, AMPTrainer):
    pass


class CPUAMPTrainer(FiniteLossCheck, SimpleTrainer):
    """:class:`SimpleTrainer` with the forward pass and losses under bfloat16 autocast on CPU.

    Detectron2's AMPTrainer is CUDA-only (fp16, which needs loss scaling). bfloat16 keeps float32's exponent
    range, so gradients are used as they are. On CPUs with bfloat16 instructions (AVX512-BF16, AMX) wide
    convolutions run up to ~2x faster; narrow models such as the quick start's gain little.
    """

    def run_step(self):
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def add_gradient_clipping(optimizer, max_norm: float, norm_type: float = 2.0):
    """Makes ``optimizer.step`` first clip the norm of all gradients together and log it as ``grad_norm``.

    Inside ``step`` the clipping sees true gradients under AMP too: GradScaler unscales before calling it, and
    skips it (so no clipping) when they overflowed.
    """

    class ClippedOptimizer(type(optimizer)):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            get_event_storage().put_scalar("grad_norm", norm.item(), smoothing_hint=False)
            return super().step(closure)

    ClippedOptimizer.__name__ = ClippedOptimizer.__qualname__ = type(optimizer).__name__ + "WithGradientClip"
    optimizer.__class__ = ClippedOptimizer
    return optimizer


def build_trainer(cfg, model, data_loader, optimizer):
    if not cfg.train.amp.enabled:
        return CheckedSimpleTrainer(model, data_loader, optimizer)
    if torch.device(cfg.train.device).type == "cuda":
        return CheckedAMPTrainer(model, data_loader, optimizer)
    return CPUAMPTrainer(model, data_loader, optimizer)


def _create_ddp_model(model, cfg):
    kwargs = dict(cfg.train.ddp)
    if torch.device(cfg.train.device).type == "cpu":
        kwargs["device_ids"] = None  # DDP's CPU mode; Detectron2 would name the local GPU
    return create_ddp_model(model, **kwargs)


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    # The loader first: a generated dataset writes the json the evaluator reads when it is first loaded.
    data_loader = instantiate(cfg.dataloader.test)
    results = inference_on_dataset(model, data_loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def _continue_data_stream(cfg, start_iter):
    """Makes the train loader start its sample stream at batch ``start_iter`` when its builder can."""
    target = cfg.dataloader.train._target_
    target = locate(target) if isinstance(target, str) else target
    if "start_iter" in inspect.signature(target).parameters:
        cfg.dataloader.train.start_iter = start_iter
        logger.info(f"The training data continues at batch {start_iter} of its stream.")
    else:
        logger.warning(
            f"{getattr(target, '__name__', target)} takes no start_iter: the resumed run reads its images from the "
            "start of the data stream again (tood.data.loader.build_train_loader continues it)."
        )


def do_train(args, cfg, extra_hooks=()):
    """Trains ``cfg.model`` (see Detectron2's lazyconfig_train_net.py for the config keys).

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

    checkpointer = TOODCheckpointer(model, cfg.train.output_dir)
    if args.resume and checkpointer.has_checkpoint():
        _continue_data_stream(cfg, checkpointer.last_iteration() + 1)
    train_loader = instantiate(cfg.dataloader.train)
    check_num_classes(cfg, cfg.dataloader.train.dataset.names)

    model = _create_ddp_model(model, cfg)
    trainer = build_trainer(cfg, model, train_loader, optimizer)
    trainer.checkpointer = checkpointer
    # The trainer's state holds the optimizer, the LR scheduler and AMP's grad scaler.
    checkpointer.add_checkpointable("trainer", trainer)

    last_results = {}

    def evaluate():
        last_results.clear()
        last_results.update(do_test(cfg, model))
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

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that had just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def setup(args):
    """Registers ``--register-coco`` datasets, builds the config with the overrides, sets up logging."""
    register_coco_datasets(args.register_coco)
    cfg = LazyConfig.load(args.config_file)
    check_override_keys(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_dataset_names(cfg, args.eval_only)
    _use_available_coco_eval(cfg)
    default_setup(cfg, args)
    # TOOD's modules log under "tood", e.g. the iteration where training switches from ATSS to TAL.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="tood")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        # With --resume: the last checkpoint of train.output_dir, else train.init_checkpoint; either must fit.
        checkpointer = TOODCheckpointer(model, cfg.train.output_dir, strict=True)
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)


def _cpu_worker(local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_processes_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(num_processes_per_machine)
    else:
        for i in range(world_size // num_processes_per_machine):
            ranks = list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
            group = dist.new_group(ranks, timeout=timeout)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # Processes sharing a machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)


def launch(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=timedelta(minutes=30),
):
    """Detectron2's ``launch``; without CUDA, the same processes communicating over gloo.

    Detectron2 0.6's ``launch`` requires CUDA (NCCL) for more than one process. A worker that raises or dies ends
    the run (the others are stopped, and the error names the worker); ``timeout`` bounds how long a collective
    waits for a worker that neither answers nor dies (e.g. stuck, or on a lost machine).
    """
    world_size = num_machines * num_processes_per_machine
    if torch.cuda.is_available() or world_size == 1:
        d2_launch(
            main_func, num_processes_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def argument_parser():
    parser = default_argument_parser(
        epilog="Examples:"
        + __doc__.split("Examples::", 1)[1]
        + "\nWithout CUDA, --num-gpus N starts N CPU processes. Flags go before the key=value overrides.\n"
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset under NAME before building the config (repeatable)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=1800,
        metavar="SECONDS",
        help="with several processes: how long a collective waits for a worker before the run fails",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timedelta(seconds=args.dist_timeout),
    )
