"""Training options read by tools/train_net.py (Detectron2's configs/common/train.py plus TOOD's switches)."""

import torch

train = dict(
    output_dir="./output",
    # A Detectron2 checkpoint, or an ImageNet ResNet converted by tools/convert_torchvision_resnet.py.
    init_checkpoint="",
    max_iter=90000,
    # Mixed precision: fp16 + loss scaling (Detectron2's AMPTrainer) on CUDA, bfloat16 autocast on CPU.
    amp=dict(enabled=False),
    # Clip the global gradient norm before each step (off in the reference; mmdetection's usual 35 when on).
    clip_grad=dict(enabled=False, max_norm=35.0, norm_type=2.0),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=7500, max_to_keep=100),  # every epoch at batch 16
    eval_period=7500,
    log_period=20,
    # Negative: a random seed; otherwise rank r seeds its RNGs with seed + r.
    seed=-1,
    device="cuda" if torch.cuda.is_available() else "cpu",
)
