#!/usr/bin/env python
"""Benchmark of ``TaskAlignedAssigner`` against a straightforward per-image implementation of the same algorithm.

Prints, for each GT count, the median time of a few calls and the extra peak memory of one call for both, their
ratio, and checks that both assign every anchor identically. It is a measurement, not a test.

Memory: extra peak of the heap memory PyTorch allocates on the CPU (tensors and kernels' scratch buffers; PyTorch's
CPU allocator is glibc's malloc), measured by glibc itself: each measurement runs in a fresh child process that
sets glibc's mmap threshold to 64 KiB, so every block above that is mapped on allocation and unmapped on free, and
glibc keeps the peak of the mapped bytes (``malloc_stats``' "max mmap bytes"). The inputs are memory-mapped from a
file, outside the heap; extra peak = that peak after one call minus the mapped bytes before it. (The resident set
size is no good here: recent kernels only keep it approximately, off by tens of MB on this machine.) Linux/glibc.

    python tools/benchmark_assigner.py                      # 1 thread, batch 2, 80 classes, ~20000 anchors
    python tools/benchmark_assigner.py --gts 10 100 --repeats 3
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "TOOD"))

from tood.assigner import INSIDE_MARGIN, TaskAlignedAssigner, paired_box_iou  # noqa: E402
from tood.priors import level_boxes, multi_level_points  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)


def reference_assign(pred_scores, pred_boxes, anchor_points, gt_boxes, gt_labels, topk=13, alpha=1.0, beta=6.0):
    """Task-aligned assignment as written in the paper and mmdet: dense (A, G) matrices, one image at a time."""
    num_imgs, num_anchors, _ = pred_scores.shape
    gt_index = torch.full((num_imgs, num_anchors), -1, dtype=torch.long)
    target = torch.zeros(num_imgs, num_anchors)
    for i in range(num_imgs):
        gts, labels = gt_boxes[i], gt_labels[i]
        if len(gts) == 0:
            continue
        iou = paired_box_iou(pred_boxes[i][:, None], gts[None])[0]  # (A, G)
        metric = pred_scores[i][:, labels] ** alpha * iou**beta
        cand = metric.topk(min(topk, num_anchors), dim=0).indices  # (k, G)
        cand_metric = metric.gather(0, cand)
        pts = anchor_points[cand]  # (k, G, 2)
        dist = torch.cat([pts - gts[None, :, :2], gts[None, :, 2:] - pts], dim=-1)
        pos = (cand_metric > 0) & (dist.amin(-1) > INSIDE_MARGIN)
        gt_ids = torch.arange(len(gts)).expand_as(cand)
        claimed = torch.full_like(iou, float("-inf"))
        claimed[cand[pos], gt_ids[pos]] = iou[cand[pos], gt_ids[pos]]
        best_iou, best_gt = claimed.max(dim=1)
        assigned = best_iou > float("-inf")
        gt_index[i, assigned] = best_gt[assigned]
        for g in best_gt[assigned].unique():
            mine = (gt_index[i] == g).nonzero().squeeze(1)
            t = metric[mine, g]
            target[i, mine] = t / (t.max() + 1e-7) * iou[mine, g].max()
    return gt_index, target


def make_inputs(num_gts, num_imgs=2, num_classes=80, image_size=(832, 1152), seed=0):
    """Anchors of an 832x1152 image (19953), random GTs of varied size, predicted boxes near their anchors, half
    of those inside a GT shaped like that GT."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_size
    sizes = [(-(-h // s), -(-w // s)) for s in STRIDES]
    points_per_level = multi_level_points(sizes, STRIDES)
    points = torch.cat(points_per_level)
    priors = torch.cat([level_boxes(p, s) for p, s in zip(points_per_level, STRIDES)])
    num_anchors = len(points)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    gt_boxes, gt_labels, pred_boxes = [], [], []
    for _ in range(num_imgs):
        side = torch.exp(rand(num_gts, 1) * (torch.log(torch.tensor(400.0 / 8)))) * 8  # 8..400 px, log-uniform
        wh = side * torch.cat([torch.ones(num_gts, 1), 0.5 + 1.5 * rand(num_gts, 1)], 1)  # aspect 0.5..2
        ctr = rand(num_gts, 2) * torch.tensor([w, h])
        gts = torch.cat([ctr - wh / 2, ctr + wh / 2], 1).clamp(min=0)
        gts = torch.min(gts, torch.tensor([w, h, w, h], dtype=torch.float32))
        gt_boxes.append(gts)
        gt_labels.append(torch.randint(num_classes, (num_gts,), generator=gen))

        # Prior-like boxes jittered around each anchor...
        prior_wh = (priors[:, 2:] - priors[:, :2]) * torch.exp(0.3 * torch.randn(num_anchors, 2, generator=gen))
        jitter = (rand(num_anchors, 2) - 0.5) * (priors[:, 2:] - priors[:, :2]) / 8
        boxes = torch.cat([points + jitter - prior_wh / 2, points + jitter + prior_wh / 2], 1)
        # ...and half of the anchors inside a GT predict a box close to that GT.
        if num_gts:
            inside = (points[:, None] > gts[None, :, :2]).all(-1) & (points[:, None] < gts[None, :, 2:]).all(-1)
            has_gt, first_gt = inside.any(1), inside.float().argmax(1)
            take = has_gt & (rand(num_anchors) < 0.5)
            gt_like = gts[first_gt[take]]
            gt_wh = (gt_like[:, 2:] - gt_like[:, :2]).repeat(1, 2)
            boxes[take] = gt_like + 0.1 * gt_wh * torch.randn(int(take.sum()), 4, generator=gen)
        pred_boxes.append(boxes)
    scores = rand(num_imgs, num_anchors, num_classes)
    return scores, torch.stack(pred_boxes), points, gt_boxes, gt_labels


def time_ms(fn, repeats):
    """Median wall-clock milliseconds of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mapped_now_and_peak(libc):
    """glibc's currently mapped bytes and their peak since the process started."""
    libc.mallinfo2.restype = _MallInfo2
    now = libc.mallinfo2().hblkhd
    with tempfile.TemporaryFile() as f:  # malloc_stats prints to stderr: send it to a file for a moment
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(f.fileno(), 2)
        libc.malloc_stats()
        os.dup2(saved, 2)
        os.close(saved)
        f.seek(0)
        peak = next(int(line.split("=")[1]) for line in f.read().decode().splitlines() if "max mmap bytes" in line)
    return now, peak


def extra_peak_mb(which, inputs_path, threads):
    """Extra peak MB of one call of ``which`` ("ours" or "reference") on saved inputs, in a fresh process."""
    cmd = [sys.executable, __file__, "--measure", which, inputs_path, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def _measure_child(which, inputs_path):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    libc.mallopt(-4, 1 << 30)  # M_MMAP_MAX: never fall back to the heap
    inputs = torch.load(inputs_path, mmap=True, weights_only=True)
    fn = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0) if which == "ours" else reference_assign
    mapped, peak_before = _mapped_now_and_peak(libc)
    fn(*inputs)
    _, peak = _mapped_now_and_peak(libc)
    if peak <= peak_before:
        raise RuntimeError("the call did not exceed the earlier peak: its own peak is unknown")
    print((peak - mapped) / 2**20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500, 2000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--measure", nargs=2, metavar=("WHICH", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.measure:
        return _measure_child(*args.measure)
    assigner = TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0)

    print(
        f"TaskAlignedAssigner vs reference: {args.threads} thread(s), batch 2, 80 classes, top-13, "
        f"median of {args.repeats}, default memory budget {assigner.memory_budget_mb:.0f} MB"
    )
    header = f"{'anchors':>8} {'GTs':>5} | {'ours ms':>8} {'ours MB':>8} | {'ref ms':>8} {'ref MB':>8} | "
    print(header + f"{'speed-up':>8} {'positives':>9} identical")
    with tempfile.TemporaryDirectory() as tmp:
        for num_gts in args.gts:
            inputs = make_inputs(num_gts)
            ours_ms, ours = time_ms(lambda: assigner(*inputs), args.repeats)  # noqa: B023
            ref_ms, (ref_index, ref_target) = time_ms(lambda: reference_assign(*inputs), args.repeats)  # noqa: B023
            same = torch.equal(ours.gt_index, ref_index) and torch.allclose(
                ours.alignment_target, ref_target, rtol=1e-5, atol=0
            )
            path = os.path.join(tmp, f"inputs_{num_gts}.pt")
            torch.save(inputs, path)
            ours_mb = extra_peak_mb("ours", path, args.threads)
            ref_mb = extra_peak_mb("reference", path, args.threads)
            print(
                f"{inputs[0].shape[1]:>8} {num_gts:>5} | {ours_ms:>8.1f} {ours_mb:>8.1f} | {ref_ms:>8.1f} "
                f"{ref_mb:>8.1f} | {ref_ms / ours_ms:>7.1f}x {int((ref_index >= 0).sum()):>9} {same}"
            )


if __name__ == "__main__":
    main()
