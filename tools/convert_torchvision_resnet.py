#!/usr/bin/env python
"""Convert an ImageNet ResNet / ResNeXt checkpoint (torchvision's, or open-mmlab's) into Detectron2's backbone naming.

TOOD's configs start from the ImageNet weights mmdetection's TOOD configs name, which no machine of this project
can download: fetch them where you can,

    https://download.pytorch.org/models/resnet50-0676ba61.pth          (configs/tood_R_50_*; torchvision://resnet50)
    https://download.pytorch.org/models/resnet101-63fe2227.pth         (configs/tood_R_101_*; torchvision://resnet101)
    https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth
                                    (configs/tood_X_101_64x4d_*; open-mmlab://resnext101_64x4d, mmcv's model zoo)

(or ``torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), "r50.pth")``), then

    tools/convert_torchvision_resnet.py resnet50-0676ba61.pth pretrained/resnet50_torchvision.pkl
    tools/convert_torchvision_resnet.py resnext101_64x4d-ee2c6f71.pth pretrained/resnext101_64x4d_open-mmlab.pkl

and train with the configs as they are (their ``train.init_checkpoint`` is the output path above).
open-mmlab's ResNeXt file is the official ResNeXt release converted to the names of mmdetection's ResNeXt, which
are torchvision's (``conv1``, ``bn1``, ``layerK.i.convJ`` / ``bnJ`` / ``downsample.{0,1}``, 64 groups of 4
channels in ``layer1``'s 3x3 convs); with or without a ``state_dict`` wrapper, ``module.`` prefixes, the
classifier ``fc`` or BN step counters, it converts alike. (torchvision's own ``resnext101_64x4d`` weights convert
too, but are another, later ImageNet training than the reference's.)

The output is a Detectron2 model-zoo ``.pkl`` (``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ...)
that DetectionCheckpointer matches to ``backbone.bottom_up.*`` of any model built on Detectron2's ResNet; the BN
statistics become the frozen BN buffers (``weight``, ``bias``, ``running_mean``, ``running_var``), the classifier
(``fc``) is dropped. The configs must use torchvision's stride placement (``stride_in_1x1=False``) and RGB input
normalised with ImageNet's mean/std, as TOOD's do (mmdetection's X-101 configs normalise alike).
"""

import argparse
import os
import pickle
from typing import Dict

import numpy as np
import torch

from tood.conversion import torchvision_resnet_to_detectron2


def convert_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """A torchvision-named ResNet state dict -> Detectron2-named numpy arrays (``fc`` and BN step counters dropped).

    The renaming is :func:`tood.conversion.torchvision_resnet_to_detectron2`, which also converts mmdetection's
    backbones; it refuses keys that are not ResNet tensors.
    """
    return {k: v.detach().cpu().float().numpy() for k, v in torchvision_resnet_to_detectron2(state_dict).items()}


def load_torchvision_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A ``.pth`` holding a state dict, or a checkpoint with it under "state_dict" (mmcv's) / "model"."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    # Checkpoints saved from DataParallel / DDP prefix every key.
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="ImageNet checkpoint (.pth) in torchvision's names")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error("the output must end with .pkl (DetectionCheckpointer reads model-zoo weights from .pkl)")

    model = convert_state_dict(load_torchvision_state_dict(args.input))
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "wb") as f:
        # matching_heuristics: keys match by suffix, e.g. into backbone.bottom_up of an FPN backbone.
        author = f"{os.path.basename(args.input)}, converted by tools/convert_torchvision_resnet.py"
        pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, f)
    print(f"Wrote {len(model)} tensors to {args.output}")


if __name__ == "__main__":
    main()
