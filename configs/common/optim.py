"""Optimizers: Detectron2's ``common/optim.py`` SGD set as the reference's, its AdamW for small from-scratch runs."""

from tood.compat import common_optim

_optim = common_optim()

# The reference: lr 0.01 for a total batch of 16, momentum 0.9, weight decay 1e-4 on every parameter (no
# paramwise_cfg in mmdetection's TOOD configs: norms, biases and the per-level scales too), hence no norm override.
SGD = _optim.SGD
SGD.lr = 0.01
SGD.params.weight_decay_norm = None

# From-scratch training on small data (configs/quickstart_shapes.py): converges far faster than SGD there.
# Weight decay is decoupled (AdamW) and spared on norms, as usual for AdamW.
AdamW = _optim.AdamW
AdamW.lr = 1e-3
AdamW.weight_decay = 0.05
AdamW.params.weight_decay_norm = 0.0
