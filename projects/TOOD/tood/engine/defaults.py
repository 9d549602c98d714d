"""Training with Detectron2's ``DefaultTrainer`` from a YAML config (``tood.add_tood_config``).

Detectron2 has two standard loops, and TOOD keeps both: LazyConfig files train through
:func:`tood.engine.do_train` (as ``tools/lazyconfig_train_net.py``), YAML configs through :class:`Trainer`
(as ``tools/train_net.py`` with ``DefaultTrainer``; :func:`main_yaml` is that script's ``main``). Both run the same
inner loops (:mod:`tood.engine.train_loop`: finite-loss check, bfloat16 on CPU), the same atomic, finite checkpoints
(:class:`tood.checkpoint.TOODCheckpointer`) and the same checked loading of weights
(:func:`tood.checkpoint.load_weights`).
"""

import logging
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, default_setup
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import load_trained_model, load_weights
from ..compat import has_compiled_ops
from ..config import add_tood_config
from ..data.checks import CheckedDatasetMapper, check_registered, get_checked_dataset_dicts
from ..precision import PRECISIONS, choose_inference_precision, inference_autocast
from ..transforms import with_reference_resize
from .arguments import register_coco_datasets
from .config_checks import check_override_keys
from .train_loop import build_trainer

__all__ = ["Trainer", "main_yaml", "setup_yaml"]


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` for TOOD: COCO evaluation, TOOD's checked data, inner loop and checkpointer.

    Example::

        cfg = get_cfg()
        tood.add_tood_config(cfg)
        cfg.merge_from_file("configs/COCO-Detection/tood_R_50_FPN_1x.yaml")
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, with TOOD's inner loop and checkpointer built once: DefaultTrainer's own
        # build Detectron2's loop (whose AMP asserts CUDA) and hooks whose writers a second build would leave open.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        if comm.get_world_size() > 1 and torch.device(cfg.MODEL.DEVICE).type == "cpu":
            raise ValueError(
                "Trainer (Detectron2's DefaultTrainer) trains in several processes on GPUs only: train a YAML config "
                "on CPU in one process, or use a LazyConfig (configs/*.py), which trains in several CPU processes too."
            )
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        # The checkpoints hold this trainer's state: its hooks' (the LR schedule) and the inner loop's.
        self._trainer = build_trainer(
            model,
            data_loader,
            optimizer,
            amp=cfg.SOLVER.AMP.ENABLED,
            device=cfg.MODEL.DEVICE,
            output_dir=cfg.OUTPUT_DIR,
            state=weakref.proxy(self),
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self._trainer.checkpointer
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """``DefaultTrainer.auto_scale_workers`` (``SOLVER.REFERENCE_WORLD_SIZE``), which also scales
        ``MODEL.TOOD.TAL_START_ITER`` with the schedule's other iteration counts."""
        scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
        if scaled is cfg or cfg.MODEL.TOOD.TAL_START_ITER is None:
            return scaled
        frozen = scaled.is_frozen()
        scaled.defrost()
        scale = num_workers / cfg.SOLVER.REFERENCE_WORLD_SIZE
        scaled.MODEL.TOOD.TAL_START_ITER = int(round(cfg.MODEL.TOOD.TAL_START_ITER / scale))
        if frozen:
            scaled.freeze()
        return scaled

    def resume_or_load(self, resume=True):
        """``DefaultTrainer.resume_or_load`` through :func:`tood.checkpoint.load_weights`: ``MODEL.WEIGHTS``
        checked first, or with ``resume`` the last checkpoint of ``OUTPUT_DIR`` and the trainer's state."""
        if load_weights(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume=resume, key="MODEL.WEIGHTS"):
            self.start_iter = self.iter + 1

    @staticmethod
    def build_mapper(cfg, is_train: bool) -> CheckedDatasetMapper:
        """The config's mapper, resizing as the reference (and the LazyConfig data configs) do."""
        kwargs = CheckedDatasetMapper.from_config(cfg, is_train)
        kwargs["augmentations"] = with_reference_resize(kwargs["augmentations"])
        return CheckedDatasetMapper(**kwargs)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = get_checked_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=cls.build_mapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=cls.build_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or cfg.OUTPUT_DIR, use_fast_impl=has_compiled_ops())

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test`` in the precision of ``TEST.PRECISION``
        (:func:`tood.precision.choose_inference_precision`)."""
        bf16, why = choose_inference_precision(cfg.TEST.PRECISION or None, cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE)
        logging.getLogger("detectron2").info(f"Evaluation precision: {why}")
        with inference_autocast(bf16, cfg.MODEL.DEVICE):
            return super().test(cfg, model, evaluators)


def setup_yaml(args):
    """The frozen yacs config of ``args.config_file`` with the ``KEY VALUE`` overrides of ``args.opts`` and
    ``--precision`` (``TEST.PRECISION``), the ``--register-coco`` datasets registered first; then Detectron2's
    ``default_setup`` (logging, seed, the config saved with the run)."""
    register_coco_datasets(args.register_coco)
    cfg = get_cfg()
    add_tood_config(cfg)
    # As a LazyConfig's train.device: the GPU if there is one (Detectron2's default is always "cuda").
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.merge_from_file(args.config_file)
    check_override_keys(cfg, args.opts)
    cfg.merge_from_list(args.opts)
    if args.precision:
        cfg.TEST.PRECISION = args.precision
    if cfg.TEST.PRECISION not in ("", *PRECISIONS):
        raise ValueError(
            f"TEST.PRECISION must be one of {', '.join(PRECISIONS)}, or '' for the training precision; "
            f"got {cfg.TEST.PRECISION!r}"
        )
    cfg.freeze()
    check_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
    if not args.eval_only:
        check_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    default_setup(cfg, args)
    # TOOD's modules log under "tood", e.g. the iteration where training switches from ATSS to TAL.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="tood")
    return cfg


def main_yaml(args):
    """``tools/train_net.py`` with a YAML config: Detectron2's ``DefaultTrainer`` flow with :class:`Trainer`.

    ``--eval-only`` evaluates ``MODEL.WEIGHTS`` (with ``--resume``, the last checkpoint of ``OUTPUT_DIR``), which must
    fit the model exactly, on ``DATASETS.TEST``; otherwise trains (with ``--resume``, from that last checkpoint).

    Returns:
        dict: the evaluation results with ``--eval-only``; otherwise what ``DefaultTrainer.train`` returns.
    """
    cfg = setup_yaml(args)
    if not args.eval_only:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    model = Trainer.build_model(cfg)
    load_trained_model(model, cfg.MODEL.WEIGHTS, save_dir=cfg.OUTPUT_DIR, resume=args.resume, key="MODEL.WEIGHTS")
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        verify_results(cfg, results)
    return results
