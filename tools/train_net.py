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
  built, so ``dataloader.train.dataset.names=NAME`` needs no code.
* The ``tood`` logger (ATSS warm-up -> task-aligned assignment switch) goes to the console and log.txt.

Examples::

    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8
    tools/train_net.py --config-file configs/tood_R_50_1x.py --num-gpus 8 --resume
    tools/train_net.py --config-file configs/tood_R_50_1x.py --eval-only train.init_checkpoint=model_final.pth
    tools/train_net.py --config-file configs/quickstart_shapes.py \\
        --register-coco mine_train mine/train.json mine/images --register-coco mine_val mine/val.json mine/images \\
        dataloader.train.dataset.names=mine_train dataloader.test.dataset.names=mine_val model.num_classes=3
"""

import logging
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances
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

import tood  # noqa: F401  registers TOOD's meta-architecture, config resolvers and generated datasets

logger = logging.getLogger("detectron2")


def register_coco_datasets(specs):
    """Registers each ``(name, json_file, image_root)`` as a COCO instances dataset (``--register-coco``)."""
    for name, json_file, image_root in specs or ():
        register_coco_instances(name, {}, json_file, image_root)


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


class CPUAMPTrainer(SimpleTrainer):
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
        return SimpleTrainer(model, data_loader, optimizer)
    if torch.device(cfg.train.device).type == "cuda":
        return AMPTrainer(model, data_loader, optimizer)
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

    train_loader = instantiate(cfg.dataloader.train)
    check_num_classes(cfg, cfg.dataloader.train.dataset.names)

    model = _create_ddp_model(model, cfg)
    trainer = build_trainer(cfg, model, train_loader, optimizer)
    # The trainer's state holds the optimizer, the LR scheduler and AMP's grad scaler.
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)

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
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
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
        # With --resume: the last checkpoint of train.output_dir, else train.init_checkpoint.
        DetectionCheckpointer(model, cfg.train.output_dir).resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)


def _cpu_worker(local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args):
    rank = machine_rank * num_processes_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank)
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(num_processes_per_machine)
    else:
        for i in range(world_size // num_processes_per_machine):
            group = dist.new_group(list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # Processes sharing a machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)


def launch(main_func, num_processes_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """Detectron2's ``launch``; without CUDA, the same processes communicating over gloo.

    Detectron2 0.6's ``launch`` requires CUDA (NCCL) for more than one process.
    """
    world_size = num_machines * num_processes_per_machine
    if torch.cuda.is_available() or world_size == 1:
        d2_launch(main_func, num_processes_per_machine, num_machines, machine_rank, dist_url, args=args)
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args),
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
    )
