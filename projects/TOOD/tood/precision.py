"""The precision TOOD computes in: chosen by the CPU's bfloat16 units unless the config or the command line says.

Training: ``train.amp.enabled`` (:func:`choose_precision`). Inference (evaluation, ``LazyPredictor``,
``tools/demo.py``, an export): ``--precision`` / ``precision=`` ``"auto"``, ``"fp32"`` or ``"bf16"``
(:func:`choose_inference_precision`), by default what training chose. Every choice comes with its reason in words,
which the tools say before they compute.
"""

from typing import Optional, Tuple

import torch

__all__ = [
    "PRECISIONS",
    "choose_inference_precision",
    "choose_precision",
    "cpu_bfloat16_units",
    "inference_autocast",
]

# The inference precisions: chosen by the CPU, float32, bfloat16 autocast.
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bfloat16_units() -> Tuple[str, ...]:
    """The bfloat16 units of this CPU that PyTorch's oneDNN kernels use: "AVX512-BF16" and / or "AMX"; () if none.

    Read from PyTorch itself (``torch.cpu``'s feature probes, and oneDNN's bfloat16 support). Where these exist,
    bfloat16 autocast trains about twice as fast as float32 (the quick start: 1.75x on an AVX512-BF16 CPU); without
    them oneDNN emulates bfloat16, and autocast is several times slower than float32 (9.5x measured on an AVX2 CPU).
    """
    units = tuple(
        name
        for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))
        if getattr(torch.cpu, probe, lambda: False)()
    )
    return units if units and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()


def _name(bf16: bool) -> str:
    return "bfloat16 autocast" if bf16 else "float32"


def _by_the_cpu(to_fp32: str, to_bf16: str) -> Tuple[bool, str]:
    """bfloat16 where the CPU has bfloat16 units, and why; ``to_fp32`` / ``to_bf16`` say how to choose otherwise."""
    units = cpu_bfloat16_units()
    if units:
        return True, f"bfloat16 autocast: this CPU has {' and '.join(units)} ({to_fp32} for float32)"
    capability = torch.backends.cpu.get_cpu_capability()
    return False, f"float32: no bfloat16 units on this CPU ({capability}; {to_bf16} forces bfloat16)"


def choose_precision(amp: Optional[bool], device="cpu") -> Tuple[bool, str]:
    """Whether to train with mixed precision, and why, in words.

    Args:
        amp: ``train.amp.enabled``: True or False is used as it is; None chooses: on CPU bfloat16 autocast where
            the CPU has bfloat16 units (:func:`cpu_bfloat16_units`), float32 elsewhere; float32 on CUDA.
    """
    cpu = torch.device(device).type == "cpu"
    mixed = "bfloat16 autocast" if cpu else "float16 autocast with loss scaling"
    if amp is not None:
        return bool(amp), f"{mixed if amp else 'float32'}: train.amp.enabled={bool(amp)}"
    if not cpu:
        return False, "float32: train.amp.enabled is open (None), and only a CPU's precision is chosen by its units"
    return _by_the_cpu("train.amp.enabled=False", "train.amp.enabled=True")


def choose_inference_precision(precision: Optional[str], amp: Optional[bool] = None, device="cpu") -> Tuple[bool, str]:
    """Whether to predict in bfloat16 autocast, and why, in words.

    Args:
        precision: ``"auto"``: bfloat16 on a CPU with bfloat16 units (:func:`cpu_bfloat16_units`), float32 elsewhere
            and on CUDA; ``"fp32"``; ``"bf16"``. None: as training chose, from ``amp`` (``train.amp.enabled``, see
            :func:`choose_precision`) on CPU; float32 on CUDA, as Detectron2's inference.
    """
    cpu = torch.device(device).type == "cpu"
    if precision is None:
        if not cpu:
            return False, "float32: inference on CUDA, as Detectron2's (--precision bf16 for bfloat16 autocast)"
        if amp is None:
            return _by_the_cpu("--precision fp32", "--precision bf16")
        bf16 = bool(amp)
        other = "fp32" if bf16 else "bf16"
        return bf16, f"{_name(bf16)}: as training, train.amp.enabled={bf16} (--precision {other} for {_name(not bf16)})"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16", f"{_name(precision == 'bf16')}: --precision {precision}"
    if not cpu:
        return False, "float32: --precision auto chooses bfloat16 by a CPU's units only"
    return _by_the_cpu("--precision fp32", "--precision bf16")


def inference_autocast(bf16: bool, device="cpu"):
    """The autocast context of inference: bfloat16 autocast on ``device`` if ``bf16``, none otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
