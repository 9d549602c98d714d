"""The measurements behind README.md's Performance section; ``tools/benchmark.py`` and
``tools/benchmark_assigner.py`` parse arguments and call these.

* :mod:`.detectors`: size, speed and memory of TOOD next to Detectron2's RetinaNet R-50-FPN.
* :mod:`.profiling`: the time of each part of a detector in a training iteration and an inference.
* :mod:`.assigner`: ``TaskAlignedAssigner`` against a per-image transcription of the reference algorithm.

The timing loop and the peak-memory probes they share are :mod:`tood.engine.benchmark`.
"""
