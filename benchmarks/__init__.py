"""The measurements behind docs/benchmarks.md; ``tools/benchmark.py``, ``tools/benchmark_assigner.py``,
``tools/benchmark_training.py`` and ``tools/gpu_check.py`` parse arguments and call these.

* :mod:`.detectors`: size, speed and memory of TOOD next to Detectron2's RetinaNet R-50-FPN.
* :mod:`.profiling`: the time of each part of a detector in a training iteration and an inference.
* :mod:`.assigner`: ``TaskAlignedAssigner`` against a per-image transcription of the reference algorithm.
* :mod:`.training`: the training speed of variants of one config (precision, memory format, size, batch, overrides).
* :mod:`.gpu`: what ``tools/gpu_check.py`` measures on a GPU (parity, training speed and memory, DCNv2, the assigner,
  float16 AMP).

The timing loop and the peak-memory probes they share are :mod:`.timing`.
"""


def image_size(text: str):
    """A command line's ``HxW`` -> (H, W)."""
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w
