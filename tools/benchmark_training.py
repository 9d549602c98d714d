#!/usr/bin/env python
"""Training speed of variants of one config, side by side in one process: precision, memory format, image size,
batch and config overrides.

Every combination of --precision, --memory-format, --sizes, --batch-sizes and --variant is timed on random
images with random boxes (``benchmarks.training``); the variants' iterations alternate, and each row gives
the median s / iteration, images / s and the ratio to the first row. The first value of each axis makes the first
row: the baseline.

--variant "NAME: key=value key=value" adds a config variant (overrides separated by spaces); without any, the
config as it is. "amp" is bfloat16 autocast on CPU (fast only on CPUs with bfloat16 units: AVX512-BF16, AMX) and
fp16 on CUDA.

Examples::

    tools/benchmark_training.py --sizes 320x320 --batch-sizes 8 --precision fp32 amp \\
        --memory-format contiguous channels_last
    tools/benchmark_training.py --variant "as is:" --variant "3 head convs: model.head.stacked_convs=3"
"""

import argparse
import os

import torch

import tood  # noqa: F401  registers TOOD's meta-architecture and config resolvers
from benchmarks import image_size
from benchmarks.training import training_speed_table, training_variants

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart_shapes.py"
)


def variant(text):
    name, sep, opts = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'expected "NAME: key=value ...", got {text!r}')
    return name.strip(), opts.split()


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="LazyConfig (default: the quick start's)")
    parser.add_argument("--variant", type=variant, action="append", help='"NAME: key=value ...", repeatable')
    parser.add_argument("--precision", nargs="+", choices=["fp32", "amp"], default=["fp32"])
    parser.add_argument("--memory-format", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous"])
    parser.add_argument("--sizes", type=image_size, nargs="+", default=[(320, 320)], help="HxW of the training images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--gts", type=int, default=8, help="ground-truth boxes per image")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = training_variants(
        dict(args.variant or [("as configured", [])]), args.precision, args.memory_format, args.sizes, args.batch_sizes
    )
    print(training_speed_table(args.config_file, variants, args.device, args.iters, args.warmup, args.gts))
