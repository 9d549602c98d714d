#!/usr/bin/env python
"""Size, speed and memory of TOOD next to Detectron2's RetinaNet R-50-FPN, both built and run in one process.

Parameters, fvcore FLOPs of the dense network at ``--flops-size``, inference latency and images/s per batch size,
time and extra peak memory of a training iteration, on each device and precision, with the ratio TOOD / RetinaNet
(what is measured, and how: ``benchmarks.detectors``). The two models' timed runs alternate after
``--warmup`` untimed rounds and medians are reported. Weights are random, images random, every training image
has ``--gts`` random boxes, and TOOD trains in its task-aligned phase (``--tood-phase atss``: its warm-up). Random
weights score almost no location above the inference threshold, so post-processing has next to nothing to do;
``--test-score-thresh 0`` gives it the most (every location and class are candidates).

Peak memory on CUDA is ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size, which includes the
allocator's overhead and which Linux keeps only to some tens of MB (``benchmarks.timing``).

The last table times ``TaskAlignedAssigner`` against the per-image reference (tools/benchmark_assigner.py prints
the full table, with memory). ``--profile`` instead profiles one training iteration and one inference of each
model on CPU and prints the time of each part of the model (``benchmarks.profiling``).

Defaults on CUDA: 800x1333, inference at batch 1 and 8, training at batch 2, 20 iterations. On
CPU they are cut to run in a few minutes on 2 cores: 320x512, inference at batch 1 and 2, 3 iterations. On a
loaded machine ``--threads 1`` gives steadier figures (threads that wait for each other wait for the scheduler).

Examples::

    tools/benchmark.py                                    # CPU, and CUDA with and without AMP where available
    tools/benchmark.py --device cpu --size 800x1333 --batch-sizes 1 8 --iters 5   # the CUDA sizes on CPU
    tools/benchmark.py --device cuda --config-file configs/tood_R_101_2x_ms.py
    tools/benchmark.py --profile --size 512x768
"""

import argparse
from pathlib import Path

import torch

import tood  # noqa: F401  registers TOOD's meta-architecture and config resolvers
from benchmarks import image_size
from benchmarks.assigner import assigner_table
from benchmarks.detectors import RETINANET_CONFIG, compare_with_retinanet
from benchmarks.profiling import profile_models

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tood_R_50_1x.py"


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG), help="TOOD LazyConfig")
    parser.add_argument("--device", nargs="+", help="cpu and/or cuda (default: cpu, and cuda where available)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "amp"], help="default: fp32 on CPU, both on CUDA")
    parser.add_argument(
        "--size", type=image_size, help="HxW of the timed images (default: 800x1333 on CUDA, 320x512 on CPU)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="inference (default: 1 8 on CUDA, 1 2 on CPU)")
    parser.add_argument("--train-batch", type=int, help="training batch (default: 2)")
    parser.add_argument("--iters", type=int, help="timed rounds (default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--flops-size", type=image_size, default=(800, 1333), help="HxW of the FLOPs count")
    parser.add_argument("--gts", type=int, default=8, help="ground-truth boxes per training image")
    parser.add_argument("--tood-phase", choices=["tal", "atss"], default="tal", help="TOOD's assignment phase")
    parser.add_argument(
        "--test-score-thresh",
        type=float,
        help="both models' inference score threshold (0: the post-processing's worst case, 1000 candidates a level)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--assigner-gts", type=int, nargs="*", default=[10, 100], help="GT counts; none: skip")
    parser.add_argument("--profile", action="store_true", help="profile the parts on CPU instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    common = {
        "config_file": args.config_file,
        "opts": args.opts,
        "tood_phase": args.tood_phase,
        "num_gts": args.gts,
        "test_score_thresh": args.test_score_thresh,
    }
    if args.profile:
        for table in profile_models(size=args.size, train_batch=args.train_batch, **common):
            print(f"\n{table}")
        return
    print(f"TOOD: {' '.join([args.config_file, *args.opts])}; RetinaNet: Detectron2's {RETINANET_CONFIG}")
    tables = compare_with_retinanet(
        devices=args.device,
        precisions=args.precision,
        size=args.size,
        batch_sizes=args.batch_sizes,
        train_batch=args.train_batch,
        iters=args.iters,
        warmup=args.warmup,
        flops_size=args.flops_size,
        **common,
    )
    for table in tables:
        print(f"\n{table}")
    if args.assigner_gts:
        print(f"\n{assigner_table(args.assigner_gts, repeats=3, full=False)}")


if __name__ == "__main__":
    main(argument_parser().parse_args())
