"""TOOD's datasets: the generated shapes dataset, registered on import as ``tood_shapes_train``/``_val``."""

import warnings

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
    "DEFAULT_SPLITS",
    "ShapesConfig",
    "datasets_root",
    "generate_dataset",
    "get_shapes_dataset",
    "register_all",
    "register_shapes_dataset",
]

register_all()
