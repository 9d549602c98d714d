"""Detectron2's ``common/train.py`` plus the options TOOD's training adds (read by ``tood.engine``)."""

import torch
from detectron2 import model_zoo

train = model_zoo.get_config("common/train.py").train
# Mixed precision: fp16 + loss scaling (Detectron2's AMPTrainer) on CUDA, bfloat16 autocast on CPU.
train.amp.enabled = False
# Clip the global gradient norm before each step (off in the reference; mmdetection's usual 35 when on).
train.clip_grad = dict(enabled=False, max_norm=35.0, norm_type=2.0)
# The total batch that optimizer.lr is for; set it (16 for the zoo's configs) to scale the learning rate linearly
# to dataloader.train.total_batch_size, e.g. on fewer GPUs (tood.engine.training.scale_learning_rate).
train.reference_batch_size = None
# Negative: a random seed; otherwise rank r seeds its RNGs with seed + r.
train.seed = -1
train.device = "cuda" if torch.cuda.is_available() else "cpu"
