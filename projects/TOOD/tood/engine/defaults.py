"""Training with Detectron2's ``DefaultTrainer`` from a YAML config (``tood.add_tood_config``).

Detectron2 has two standard loops, and TOOD keeps both: LazyConfig files train through
:func:`tood.engine.do_train` (as ``tools/lazyconfig_train_net.py``), YAML configs through :class:`Trainer`
(as ``tools/train_net.py`` with ``DefaultTrainer``). Both run the same inner loops (:mod:`tood.engine.train_loop`:
finite-loss check, bfloat16 on CPU), the same atomic, finite checkpoints (:class:`tood.checkpoint.TOODCheckpointer`)
and the same weights check.
"""

import weakref

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator

from ..checkpoint import TOODCheckpointer, check_weights_file
from ..data.checks import CheckedDatasetMapper, get_checked_dataset_dicts
from .config_checks import has_compiled_ops
from .train_loop import build_trainer

__all__ = ["Trainer"]


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
        super().__init__(cfg)
        # DefaultTrainer builds Detectron2's own loop and checkpointer: the same objects go into TOOD's.
        inner = self._trainer
        self._trainer = build_trainer(
            inner.model, inner.data_loader, inner.optimizer, amp=cfg.SOLVER.AMP.ENABLED, device=cfg.MODEL.DEVICE
        )
        self.checkpointer = TOODCheckpointer(inner.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self._trainer.checkpointer = self.checkpointer
        self._hooks = []
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        if not (resume and self.checkpointer.has_checkpoint()):
            check_weights_file(self.cfg.MODEL.WEIGHTS, training=True, key="MODEL.WEIGHTS")
        super().resume_or_load(resume=resume)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = get_checked_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=CheckedDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or cfg.OUTPUT_DIR, use_fast_impl=has_compiled_ops())
