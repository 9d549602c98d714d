"""Optimizers: Detectron2's ``common/optim.py`` SGD set as the reference's, and AdamW for small from-scratch runs."""

import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

# The reference: lr 0.01 for a total batch of 16, momentum 0.9, weight decay 1e-4 on every parameter (no
# paramwise_cfg in mmdetection's TOOD configs: norms, biases and the per-level scales too), hence no norm override.
SGD = model_zoo.get_config("common/optim.py").SGD
SGD.lr = 0.01
SGD.params.weight_decay_norm = None

# From-scratch training on small data (configs/quickstart_shapes.py): converges far faster than SGD there.
# Weight decay is decoupled (AdamW) and spared on norms, as usual for AdamW.
AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-3,
    weight_decay=0.05,
)
