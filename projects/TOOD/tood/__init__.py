"""TOOD: Task-aligned One-stage Object Detection, for Detectron2.

Importing ``tood`` registers the ``TOOD`` meta-architecture, the LazyConfig resolvers of its configs and the
generated ``tood_shapes_*`` datasets.
"""

from . import data  # noqa: F401  (registers the generated datasets)
from .assigner import ATSSAssigner, TaskAlignedAssigner
from .config import register_resolvers
from .head import TOODHead
from .losses import TOODLoss
from .meta_arch import TOOD

register_resolvers()

__all__ = ["TOOD", "TOODHead", "TOODLoss", "TaskAlignedAssigner", "ATSSAssigner"]
