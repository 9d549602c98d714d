"""TOOD's datasets: the generated shapes dataset, registered on import as ``tood_shapes_train``/``_val``; the size
of COCO train2017 in its metadata."""

import warnings

from detectron2.data import MetadataCatalog

# `python -m tood.data.synthetic` runs a module that importing this package has already loaded; that is
# expected here (the CLI needs nothing from the imported copy), so runpy's warning about it is noise.
warnings.filterwarnings("ignore", message="'tood.data.synthetic' found in sys.modules", category=RuntimeWarning)

from .synthetic import (  # noqa: E402
    CLASSES,
    DEFAULT_SPLITS,
    ShapesConfig,
    datasets_root,
    generate_dataset,
    get_shapes_dataset,
    register_all,
    register_shapes_dataset,
)

__all__ = [
    "CLASSES",
    "COCO_2017_TRAIN_IMAGES",
    "DEFAULT_SPLITS",
    "ShapesConfig",
    "datasets_root",
    "generate_dataset",
    "get_shapes_dataset",
    "register_all",
    "register_shapes_dataset",
]

# COCO train2017's images with a non-crowd box (Detectron2's filter_empty; mmdetection's filter_empty_gt keeps the
# same): the epoch length of the zoo's schedules, known without reading the 450 MB annotation file.
COCO_2017_TRAIN_IMAGES = 117266

register_all()
MetadataCatalog.get("coco_2017_train").set(num_train_images=COCO_2017_TRAIN_IMAGES)
