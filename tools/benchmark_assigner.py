#!/usr/bin/env python
"""Benchmark of ``TaskAlignedAssigner`` against a straightforward per-image implementation of the same algorithm.

Prints, for each GT count, the median time of a few calls and the extra peak memory of one call for both, their
ratio, and whether both assign every anchor identically (``benchmarks.assigner``). It is a measurement, not
a test.

Memory: extra peak of the heap memory PyTorch allocates on the CPU (tensors and kernels' scratch buffers), as
glibc counts it in a fresh process (``benchmarks.timing.heap_peak_mb``; the resident set size is no good
here: recent kernels only keep it approximately, off by tens of MB). Linux/glibc.

Examples::

    tools/benchmark_assigner.py                      # 1 thread, batch 2, 80 classes, ~20000 anchors
    tools/benchmark_assigner.py --gts 10 100 --repeats 3
"""

import argparse

import torch

from benchmarks.assigner import assigner_table


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500, 2000], help="GT counts per image")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    torch.set_num_threads(args.threads)
    print(assigner_table(args.gts, args.repeats))
