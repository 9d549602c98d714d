"""Timing and peak memory of a callable, for the benchmarks and ``tools/export_model.py``.

Time: :func:`median_times` calls several functions in turn (A B A B ...), so that a change of load on a shared
machine hits them alike, and gives the median of each; on CUDA it synchronises around each call.

Peak memory, the extra peak of one call beyond what is held before it:

* on CUDA, ``torch.cuda.max_memory_allocated`` (bytes in tensors), in :func:`peak_memory_mb`;
* on CPU, two probes, because no one probe serves both a step of hundreds of MB run after warm-up in a process
  that holds models, and a call of a few MB:

  - :func:`peak_memory_mb`: the peak resident set size (Linux's VmHWM, reset through /proc/self/clear_refs) minus
    the resident size before the call, once glibc has given free memory back (``malloc_trim``). In this process,
    after any number of calls, of all memory (allocator overhead included); but Linux keeps RSS only to some tens
    of MB (per-CPU counters), so it is for calls that need hundreds of MB (a training iteration);
  - :func:`heap_peak_mb`: glibc's own peak of mapped bytes, exact, in a fresh process in which every block above
    64 KiB is mapped on allocation and unmapped on free (the heap memory PyTorch allocates on the CPU: tensors and
    kernels' scratch buffers). glibc cannot reset that peak, hence the fresh process: for a call of a few MB
    whose arguments can be sent to another process (the assigner on saved inputs).
"""

import ctypes
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Optional

import torch

__all__ = ["heap_peak_mb", "median_times", "peak_memory_mb"]

_M_MMAP_THRESHOLD, _M_MMAP_MAX = -3, -4  # mallopt parameters, glibc's malloc.h


def median_times(fns: Dict[str, Callable[[], object]], iters: int, warmup: int = 0, device=None) -> Dict[str, float]:
    """Calls each of ``fns`` in turn, ``warmup + iters`` rounds; returns name -> median seconds of the last ``iters``.

    Args:
        device: a CUDA device to synchronise before and after each call (its kernels run asynchronously).
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    times = {name: [] for name in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_mb(fn: Callable[[], object], device) -> Optional[float]:
    """Extra peak MB of one call of ``fn`` on ``device``, in this process (see the module docstring); None on a
    CPU where it cannot be measured (not Linux, or /proc/self/clear_refs not writable)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not sys.platform.startswith("linux"):
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return (_status_kb("VmHWM") - base) / 2**10


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


def _heap_peak_in_child(fn, args, num_threads):
    torch.set_num_threads(num_threads)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(_M_MMAP_MAX, 1 << 30)  # never fall back to the heap
    mapped, peak_before = _mapped_now_and_peak(libc)
    fn(*args)
    _, peak = _mapped_now_and_peak(libc)
    if peak <= peak_before:
        raise RuntimeError("the call did not exceed the process's earlier peak: its own peak is unknown")
    return (peak - mapped) / 2**20


def heap_peak_mb(fn: Callable, *args, num_threads: int = 1) -> float:
    """Extra peak MB of glibc-allocated memory of one call ``fn(*args)`` in a fresh process (Linux, glibc >= 2.33).

    ``fn`` and ``args`` are pickled to a spawned process (tensors go through shared memory, outside the measured
    heap), which runs on ``num_threads`` torch threads. See the module docstring.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_heap_peak_in_child, fn, args, num_threads).result()
