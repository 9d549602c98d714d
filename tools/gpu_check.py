#!/usr/bin/env python
"""Everything this project measures on a GPU, in one command (a few minutes on one GPU; none where CUDA is absent).

On the first CUDA device, in order (``benchmarks.gpu``):

1. inference parity: the R-50 detector with mmdetection 3.3's reference weights, converted, against the outputs
   mmdetection recorded (FPN, head, final detections) at the CPU parity tests' tolerances, TF32 off;
2. training speed and memory of configs/tood_R_50_1x.py at 2 images of 800 x 1333: 20 iterations in float32 and in
   float16 AMP, s / iteration and ``torch.cuda.max_memory_allocated``, next to the model zoo's 4.1 GB;
3. DCNv2: torchvision's CUDA deformable convolution against this project's CPU DCNv2 on the DCN configs' layers;
4. the task-aligned assigner at 19953 anchors x 500 and x 5000 ground-truth boxes: time and peak memory;
5. float16 AMP: step 0 of the R-50 detector at full size next to float32 (losses, gradient norm, finite), and the
   quick-start model trained 24 steps in float16 and float32.

Writes the figures to ``--output`` (JSON) and prints them as a table (also written next to it, ``.md``). The
reference tensors (step 1 and 5's R-50) come from ``--reference`` (default: $TOOD_ORACLE_DIR); without them those
steps are reported as skipped. Without CUDA it says so and exits 0.

Example::

    tools/gpu_check.py --output output/gpu_check.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import tood  # noqa: F401  registers TOOD's meta-architecture and config resolvers
from benchmarks import gpu

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FILE = "tood_e2e_mmdet_seed0_astronaut.pt"
ZOO_MEMORY_GB = 4.1  # mmdetection's TOOD R-50 1x: training memory per GPU at 2 images


def argument_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example:" + __doc__.split("Example::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", default="output/gpu_check.json", help="the JSON file of the figures")
    parser.add_argument(
        "--reference",
        default=os.environ.get("TOOD_ORACLE_DIR", ""),
        help=f"the folder holding {REFERENCE_FILE}",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed training iterations per precision")
    return parser


def table(results) -> str:
    """The figures of ``results`` as a markdown table: one row per measurement."""
    rows = ["| check | measurement | value |", "|---|---|---:|"]

    def add(check, values):
        for key, value in values.items():
            if isinstance(value, dict):
                add(f"{check}: {key}", value)
            else:
                rows.append(f"| {check} | {key} | {f'{value:.4g}' if isinstance(value, float) else value} |")

    for check, values in results.items():
        add(check, values if isinstance(values, dict) else {"": values})
    return "\n".join(rows)


def main(args):
    if not torch.cuda.is_available():
        print("No CUDA device here: tools/gpu_check.py measures nothing on this machine.")
        return 0
    device = torch.device("cuda")
    config = str(REPO_ROOT / "configs" / "tood_R_50_1x.py")
    quick = str(REPO_ROOT / "configs" / "quickstart_shapes.py")
    reference_path = Path(args.reference) / REFERENCE_FILE
    reference = torch.load(reference_path, weights_only=True) if args.reference and reference_path.is_file() else None
    skipped = f"skipped: {reference_path} is absent" if args.reference else "skipped: no --reference or TOOD_ORACLE_DIR"
    results = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    steps = [
        ("inference parity", lambda: gpu.inference_parity(config, reference, device) if reference else skipped),
        ("R-50 1x training, fp32", lambda: gpu.training_speed(config, device, amp=False, iters=args.iters)),
        ("R-50 1x training, fp16 AMP", lambda: gpu.training_speed(config, device, amp=True, iters=args.iters)),
        ("DCNv2 torchvision vs CPU", lambda: gpu.dcn_parity(device)),
        ("assigner", lambda: gpu.assigner_cost(device)),
        ("float16 R-50 step 0", lambda: gpu.float16_step0(config, reference, device) if reference else skipped),
        ("float16 quick start", lambda: gpu.float16_training(quick, device)),
    ]
    for name, measure in steps:
        start = time.perf_counter()
        try:
            results[name] = measure()
        except Exception as e:  # one failed measurement must not cost the others
            results[name] = f"failed: {type(e).__name__}: {e}"
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()
    results["zoo training memory, GB"] = ZOO_MEMORY_GB

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = table(results)
    output.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"Written: {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(argument_parser().parse_args()))
