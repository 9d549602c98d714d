"""The command line of ``tools/train_net.py``, which both config systems read: Detectron2's parser plus TOOD's
options, and the ``--register-coco`` datasets it names."""

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from ..data.checks import register_checked_coco
from ..precision import PRECISIONS

__all__ = ["add_precision_argument", "add_register_coco_argument", "argument_parser", "register_coco_datasets"]


def register_coco_datasets(specs):
    """Registers each ``(name, json_file, image_root)`` as a checked COCO instances dataset (``--register-coco``); a
    name already registered with the same files is left as it is."""
    for name, json_file, image_root in specs or ():
        metadata = MetadataCatalog.get(name)
        registered = name in DatasetCatalog.list()
        if not (registered and metadata.get("json_file") == json_file and metadata.get("image_root") == image_root):
            register_checked_coco(name, json_file, image_root)


def add_register_coco_argument(parser, help="register a COCO-format dataset under NAME before building the config"):
    """``--register-coco NAME JSON IMAGE_ROOT`` (repeatable), read by :func:`register_coco_datasets`."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help=help + " (repeatable)",
    )


def add_precision_argument(parser, default_help="as training: train.amp.enabled, chosen by the CPU where it is None"):
    """``--precision auto|fp32|bf16``, the precision of inference (:func:`tood.precision.choose_inference_precision`);
    None when not given."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="inference precision: auto (bfloat16 autocast on a CPU with bfloat16 units, float32 elsewhere), fp32 or "
        f"bf16 (default: {default_help})",
    )


def argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus ``--register-coco``, ``--precision`` (of evaluation) and
    ``--dist-timeout``."""
    parser = default_argument_parser(epilog=epilog)
    add_register_coco_argument(parser)
    add_precision_argument(parser)
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=1800,
        metavar="SECONDS",
        help="with several processes: how long a collective waits for a worker before the run fails",
    )
    return parser
