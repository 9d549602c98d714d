"""SGD as the reference: lr 0.01 for a total batch of 16, momentum 0.9, weight decay 1e-4.

mmdetection applies the weight decay to every parameter (no ``paramwise_cfg`` in TOOD's configs): norms,
biases and the per-level scales included, so no group gets an override here.
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

SGD = L(torch.optim.SGD)(
    # params.model is set to the model before the optimizer is instantiated (tools/train_net.py).
    params=L(get_default_optimizer_params)(),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
)

# From-scratch training on small data (configs/quickstart_shapes.py): converges far faster than SGD there.
# Weight decay is decoupled (AdamW) and spared on norms, as usual for AdamW.
AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-3,
    weight_decay=0.05,
)
