#!/usr/bin/env python
"""``make quickstart``: train TOOD from scratch on the generated shapes dataset on CPU, evaluate it with
COCOEvaluator, and draw its predictions on a few validation images.

The datasets are generated on first use (under ``$TOOD_DATASETS``, default ./datasets). ``--max-iter`` is
the time budget: the schedule of configs/quickstart_shapes.py scales with it. Training runs in bfloat16 autocast
on CPUs with bfloat16 units (AVX512-BF16, AMX) and in float32 elsewhere; the first line says which and why, and
``train.amp.enabled=True/False`` decides instead. Extra ``key=value`` arguments override the config, as for
tools/train_net.py.

Examples::

    tools/quickstart.py
    tools/quickstart.py --max-iter 300 train.amp.enabled=False
"""

import argparse
import os
import time

import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog

from tood.engine import LazyPredictor, ProgressBar, argument_parser, do_train, setup
from tood.engine.visualization import run_on_images
from tood.precision import choose_precision

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples::" + __doc__.split("Examples::", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default=os.path.join(REPO_ROOT, "configs", "quickstart_shapes.py"))
    parser.add_argument("--max-iter", type=int, help="training iterations (default: the config's train.max_iter)")
    parser.add_argument("--output", default="output/quickstart", help="checkpoints, logs, drawn predictions")
    parser.add_argument("--num-images", type=int, default=8, help="validation images to draw predictions on")
    parser.add_argument("--confidence-threshold", type=float, default=0.4, help="draw detections scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    args = parser.parse_args(argv)

    overrides = [f"train.output_dir={args.output}"]
    if args.max_iter is not None:
        overrides.append(f"train.max_iter={args.max_iter}")
    train_args = argument_parser().parse_args(["--config-file", args.config_file, *overrides, *args.opts])
    # Said first, before the set-up's logs: the precision follows the CPU unless the config or the command line sets it.
    train = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts).train
    amp, precision = choose_precision(train.amp.enabled, train.device)
    print(f"Precision: {precision}", flush=True)
    cfg = setup(train_args)

    start = time.perf_counter()
    progress = ProgressBar()
    results = do_train(train_args, cfg, extra_hooks=[progress])
    elapsed = time.perf_counter() - start

    cfg.train.init_checkpoint = os.path.join(args.output, "model_final.pth")
    predictor = LazyPredictor(cfg)
    val_name = cfg.dataloader.test.dataset.names
    paths = [d["file_name"] for d in DatasetCatalog.get(val_name)[: args.num_images]]
    drawn = run_on_images(predictor, paths, os.path.join(args.output, "predictions"), args.confidence_threshold)

    print(
        f"\nTrained {progress.iterations} iterations in {progress.seconds / 60:.1f} min "
        f"({progress.seconds / max(progress.iterations, 1):.2f} s/iteration, {torch.get_num_threads()} threads, "
        f"{'bfloat16' if amp else 'float32'}) "
        f"and evaluated: {elapsed / 60:.1f} min in all."
    )
    if "bbox" in results:
        print(f"Box AP on {val_name}: {results['bbox']['AP']:.1f} (AP50 {results['bbox']['AP50']:.1f})")
    print(f"Model: {cfg.train.init_checkpoint}; log: {os.path.join(args.output, 'log.txt')}")
    print(f"Predictions drawn on {len(drawn)} validation images in {os.path.dirname(drawn[0])}/")
    return results


if __name__ == "__main__":
    main()
