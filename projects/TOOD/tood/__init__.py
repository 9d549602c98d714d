"""TOOD: Task-aligned One-stage Object Detection, for Detectron2.

Importing ``tood`` registers the ``TOOD`` meta-architecture and the ``build_tood_resnet_fpn_backbone`` backbone
(for YAML configs, with :func:`add_tood_config`), the LazyConfig resolvers of its configs and the generated
``tood_shapes_*`` datasets.
"""

from . import data  # noqa: F401  (registers the generated datasets)
from .assigner import ATSSAssigner, TaskAlignedAssigner
from .backbone import build_tood_resnet_fpn_backbone
from .config import add_tood_config, register_resolvers
from .head import TOODHead
from .losses import TOODLoss
from .meta_arch import TOOD

register_resolvers()

__all__ = [
    "TOOD",
    "TOODHead",
    "TOODLoss",
    "TaskAlignedAssigner",
    "ATSSAssigner",
    "add_tood_config",
    "build_tood_resnet_fpn_backbone",
]
