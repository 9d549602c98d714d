#!/usr/bin/env python
"""Convert an mmdetection TOOD checkpoint (mmdetection's model zoo, or the authors' fcjian/TOOD files) for Detectron2.

    tools/convert_mmdet_to_d2.py --input tood_r50_fpn_1x_coco_20211210_103425-20e20746.pth \\
        --output pretrained/tood_R_50_1x_mmdet.pth --config configs/tood_R_50_1x.py
    tools/train_net.py --config-file configs/tood_R_50_1x.py --eval-only \\
        train.init_checkpoint=pretrained/tood_R_50_1x_mmdet.pth

The output is a Detectron2 checkpoint (``{"model": state_dict, "__author__": ..., "matching_heuristics": False}``,
written with ``torch.save``) whose names are exactly the model's, so DetectionCheckpointer loads it without
heuristic renaming. The report says what was mapped and the architecture read from the tensors (depth, ResNeXt
groups, DCN stages, classes) and, where the checkpoint carries its config text, the anchor type. With --config the
model of that LazyConfig is built (on the meta device: no memory, no weights) and the converted names and shapes are
checked against it strictly; the conversion is refused, naming every mismatch, when they differ.
"""

import argparse
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate

import tood  # noqa: F401  registers TOOD's config resolvers
from tood.conversion import convert_mmdet_checkpoint, load_mmdet_checkpoint


def build_model_skeleton(config_file: str) -> torch.nn.Module:
    """The model of a LazyConfig file, on the meta device (names and shapes only)."""
    cfg = LazyConfig.load(config_file)
    # Only the parameters matter here; the ATSS warm-up length depends on the training schedule.
    cfg.model.tal_start_iter = 0
    with torch.device("meta"):
        return instantiate(cfg.model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="mmdetection checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--config", help="LazyConfig of the model to check the converted tensors against")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pth"):
        parser.error("--output must end with .pth (Detectron2 reads .pkl files as pickled numpy, not torch.save)")

    try:
        model = build_model_skeleton(args.config) if args.config else None
        state_dict, report = convert_mmdet_checkpoint(load_mmdet_checkpoint(args.input), model)
    except ValueError as e:
        print(f"error: cannot convert {args.input}: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if model is not None:
        print(f"checked against {args.config}: all {len(state_dict)} tensors have the model's names and shapes")
    author = f"mmdetection ({report.source}), converted by tools/convert_mmdet_to_d2.py"
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    torch.save({"model": state_dict, "__author__": author, "matching_heuristics": False}, args.output)
    print(f"wrote {len(state_dict)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
