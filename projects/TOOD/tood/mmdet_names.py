"""Parameter names of mmdetection's TOODHead and of our :class:`tood.head.TOODHead`.

Keys are relative to the head (an mmdet detector checkpoint prefixes them with ``bbox_head.``). Every tensor has the
same shape and layout on both sides, so converting is renaming plus checking: a conversion refuses, naming the
culprits, when a key has no rule or no place in the target head, when a target tensor is not supplied, or when a
shape differs.
"""

import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

__all__ = [
    "HEAD_NAME_MAP",
    "HeadStateDictMismatch",
    "mmdet_to_ours",
    "ours_to_mmdet",
    "convert_mmdet_head_state_dict",
    "convert_head_state_dict_to_mmdet",
]

# (mmdetection name, our name); "{i}" stands for a non-negative integer (conv index, level index).
# mmcv's ConvModule names its conv "conv" and its GroupNorm "gn"; for a DCNv2 interactive conv, "conv" is mmcv's
# ModulatedDeformConv2dPack with its own "conv_offset". Biases of convs appear only in heads without norm.
HEAD_NAME_MAP: Tuple[Tuple[str, str], ...] = (
    ("inter_convs.{i}.conv.weight", "inter_convs.{i}.weight"),
    ("inter_convs.{i}.conv.bias", "inter_convs.{i}.bias"),
    ("inter_convs.{i}.conv.conv_offset.weight", "inter_convs.{i}.conv_offset.weight"),
    ("inter_convs.{i}.conv.conv_offset.bias", "inter_convs.{i}.conv_offset.bias"),
    ("inter_convs.{i}.gn.weight", "inter_convs.{i}.norm.weight"),
    ("inter_convs.{i}.gn.bias", "inter_convs.{i}.norm.bias"),
    *(
        rule
        for task in ("cls", "reg")
        for rule in (
            (f"{task}_decomp.layer_attention.0.weight", f"{task}_decomp.layer_attention.fc1.weight"),
            (f"{task}_decomp.layer_attention.0.bias", f"{task}_decomp.layer_attention.fc1.bias"),
            (f"{task}_decomp.layer_attention.2.weight", f"{task}_decomp.layer_attention.fc2.weight"),
            (f"{task}_decomp.layer_attention.2.bias", f"{task}_decomp.layer_attention.fc2.bias"),
            (f"{task}_decomp.reduction_conv.conv.weight", f"{task}_decomp.reduction.weight"),
            (f"{task}_decomp.reduction_conv.conv.bias", f"{task}_decomp.reduction.bias"),
            (f"{task}_decomp.reduction_conv.gn.weight", f"{task}_decomp.reduction.norm.weight"),
            (f"{task}_decomp.reduction_conv.gn.bias", f"{task}_decomp.reduction.norm.bias"),
        )
    ),
    ("tood_cls.weight", "cls_score.weight"),
    ("tood_cls.bias", "cls_score.bias"),
    ("tood_reg.weight", "bbox_pred.weight"),
    ("tood_reg.bias", "bbox_pred.bias"),
    ("cls_prob_module.0.weight", "alignment_map.reduce.weight"),
    ("cls_prob_module.0.bias", "alignment_map.reduce.bias"),
    ("cls_prob_module.2.weight", "alignment_map.predict.weight"),
    ("cls_prob_module.2.bias", "alignment_map.predict.bias"),
    ("reg_offset_module.0.weight", "offset_map.reduce.weight"),
    ("reg_offset_module.0.bias", "offset_map.reduce.bias"),
    ("reg_offset_module.2.weight", "offset_map.predict.weight"),
    ("reg_offset_module.2.bias", "offset_map.predict.bias"),
    ("scales.{i}.scale", "scales.{i}.scale"),
)


def _compile(template: str) -> "re.Pattern[str]":
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


_FORWARD = [(_compile(src), dst) for src, dst in HEAD_NAME_MAP]
_BACKWARD = [(_compile(dst), src) for src, dst in HEAD_NAME_MAP]


def _rename(name: str, rules) -> Optional[str]:
    for pattern, template in rules:
        match = pattern.match(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or "")
    return None


def mmdet_to_ours(name: str) -> Optional[str]:
    """Our name for an mmdet head parameter name, or None when no rule covers it."""
    return _rename(name, _FORWARD)


def ours_to_mmdet(name: str) -> Optional[str]:
    """mmdet's name for one of our head's parameter names, or None when no rule covers it."""
    return _rename(name, _BACKWARD)


class HeadStateDictMismatch(ValueError):
    """A head state dict that cannot be converted.

    Attributes:
        unknown: keys as given that have no rule or no such parameter in the target head.
        missing: our parameter names that the given state dict does not supply.
        wrong_shape: ``"key (given shape) (expected shape)"`` for keys as given.
    """

    def __init__(self, direction: str, unknown: List[str], missing: List[str], wrong_shape: List[str]):
        self.unknown, self.missing, self.wrong_shape = unknown, missing, wrong_shape
        parts = [
            f"{label} ({len(names)}): {', '.join(names)}"
            for label, names in (
                ("unknown keys (no rule, or no such parameter in the target head)", unknown),
                ("missing keys", [f"{k} (mmdet: {ours_to_mmdet(k)})" for k in missing]),
                ("wrong shapes", wrong_shape),
            )
            if names
        ]
        super().__init__(f"cannot convert the TOOD head state dict {direction}: " + "; ".join(parts))


def _reference_shapes(reference: Union[nn.Module, Mapping[str, Tensor]]) -> Dict[str, Tuple[int, ...]]:
    if isinstance(reference, nn.Module):
        reference = reference.state_dict()
    return {k: tuple(v.shape) for k, v in reference.items()}


def _check(
    direction: str, named: Dict[str, Tuple[str, Tensor]], unknown: List[str], expected: Dict[str, Tuple[int, ...]]
) -> None:
    """named: our name -> (name as given, tensor). Raises unless ``named`` matches ``expected`` exactly."""
    unknown = unknown + [given for ours, (given, _) in named.items() if ours not in expected]
    missing = [ours for ours in expected if ours not in named]
    wrong_shape = [
        f"{given} {tuple(t.shape)} (expected {expected[ours]})"
        for ours, (given, t) in named.items()
        if ours in expected and tuple(t.shape) != expected[ours]
    ]
    if unknown or missing or wrong_shape:
        raise HeadStateDictMismatch(direction, sorted(unknown), sorted(missing), wrong_shape)


def convert_mmdet_head_state_dict(
    state_dict: Mapping[str, Tensor], reference: Union[nn.Module, Mapping[str, Tensor]]
) -> Dict[str, Tensor]:
    """Rename an mmdet TOODHead state dict (keys without ``bbox_head.``) to our names.

    Args:
        state_dict: mmdet name -> tensor.
        reference: our head (or its state dict), which fixes the expected names and shapes (classes, DCN convs,
            levels).

    Returns:
        our name -> the same tensor, loadable with ``head.load_state_dict(..., strict=True)``.

    Raises:
        HeadStateDictMismatch: listing unknown, missing (in our names) and wrongly shaped keys.
    """
    named, unknown = {}, []
    for key, tensor in state_dict.items():
        ours = mmdet_to_ours(key)
        if ours is None:
            unknown.append(key)
        else:
            named[ours] = (key, tensor)
    _check("from mmdet", named, unknown, _reference_shapes(reference))
    return {ours: tensor for ours, (_, tensor) in named.items()}


def convert_head_state_dict_to_mmdet(
    state_dict: Mapping[str, Tensor], reference: Union[nn.Module, Mapping[str, Tensor]]
) -> Dict[str, Tensor]:
    """Rename our head's state dict to mmdet's TOODHead names (without ``bbox_head.``).

    Args:
        state_dict: our name -> tensor.
        reference: our head (or its state dict) that ``state_dict`` must match.

    Returns:
        mmdet name -> the same tensor.

    Raises:
        HeadStateDictMismatch: listing unknown, missing and wrongly shaped keys (in our names).
    """
    named = {key: (key, tensor) for key, tensor in state_dict.items()}
    unknown = [key for key in state_dict if ours_to_mmdet(key) is None]
    _check("to mmdet", {k: v for k, v in named.items() if k not in unknown}, unknown, _reference_shapes(reference))
    return {ours_to_mmdet(key): tensor for key, tensor in state_dict.items()}
