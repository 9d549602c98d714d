"""TOOD's configuration: the ``MODEL.TOOD`` keys of Detectron2's yacs config, and the OmegaConf resolvers that
TOOD's LazyConfig files use."""

from detectron2.config import CfgNode as CN
from omegaconf import OmegaConf


def add_tood_config(cfg: CN) -> None:
    """Adds ``MODEL.TOOD`` to a Detectron2 config (in place), with the reference's values, and ``TEST.PRECISION``.

    Names follow ``MODEL.RETINANET``'s where it has the same option; the maximum number of detections is
    Detectron2's ``TEST.DETECTIONS_PER_IMAGE``. Call it before merging a TOOD YAML file:

        cfg = get_cfg()
        add_tood_config(cfg)
        cfg.merge_from_file("configs/COCO-Detection/tood_R_50_FPN_1x.yaml")
    """
    cfg.MODEL.TOOD = CN()
    _C = cfg.MODEL.TOOD
    _C.NUM_CLASSES = 80
    # Backbone features the head reads, one per element of its strides.
    _C.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

    # The T-Head (tood.head.TOODHead).
    _C.FEAT_CHANNELS = 256
    _C.NUM_CONVS = 6  # task-interactive convs
    _C.NORM = "GN"
    _C.PRIOR_PROB = 0.01
    # Initial sigmoid of the alignment map; None: PRIOR_PROB, as the reference.
    _C.ALIGNMENT_PRIOR_PROB = None
    _C.ANCHOR_TYPE = "anchor_free"  # or "anchor_based"
    _C.OCTAVE_BASE_SCALE = 8.0  # prior box side in strides
    _C.NUM_DCN = 0  # the first NUM_DCN interactive convs are DCNv2
    _C.DCN_DEFORM_GROUPS = 4

    # Task alignment learning (tood.losses.TOODLoss): ATSS before TAL_START_ITER, the task-aligned assigner
    # from then on. None builds a model for inference only; training needs it (the reference: 4 of 12 epochs).
    _C.TAL_START_ITER = None
    _C.ATSS_TOPK = 9
    _C.TAL_TOPK = 13
    _C.TAL_ALPHA = 1.0
    _C.TAL_BETA = 6.0
    _C.FOCAL_LOSS_ALPHA = 0.25  # warm-up classification loss
    _C.FOCAL_LOSS_GAMMA = 2.0
    _C.QFL_BETA = 2.0  # task-aligned classification loss
    _C.CLS_LOSS_WEIGHT = 1.0
    _C.BBOX_REG_LOSS_WEIGHT = 2.0
    _C.ASSIGNER_MEMORY_BUDGET_MB = 256.0

    # Inference: per level, keep (location, class) pairs scoring above SCORE_THRESH_TEST, at most
    # TOPK_CANDIDATES_TEST of them; then class-wise NMS.
    _C.SCORE_THRESH_TEST = 0.05
    _C.TOPK_CANDIDATES_TEST = 1000
    _C.NMS_THRESH_TEST = 0.6

    # Precision of evaluation on CPU (tood.precision.choose_inference_precision): "auto", "fp32", "bf16"; "" as
    # training (SOLVER.AMP.ENABLED). tools/train_net.py's --precision sets it.
    cfg.TEST.PRECISION = ""


def schedule_fraction(total_iters, numerator, denominator) -> int:
    """``total_iters * numerator // denominator``: e.g. the ATSS warm-up is the first 4/12 of a schedule."""
    return int(total_iters) * int(numerator) // int(denominator)


def register_resolvers():
    # "${tood_schedule_fraction:${train.max_iter},4,12}" keeps the warm-up a fraction of the schedule
    # when train.max_iter is overridden on the command line.
    OmegaConf.register_new_resolver("tood_schedule_fraction", schedule_fraction, replace=True)
