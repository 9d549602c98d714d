"""Parameter names of mmdetection's TOOD (ResNet / ResNeXt backbone, FPN neck, TOODHead) and of our model.

One mechanism renames between them: a :class:`NameMap` of ``(theirs, ours)`` name templates, read both ways.
The tables: :data:`RESNET_NAME_MAP` (torchvision's and mmdetection's ResNet / ResNeXt, also their ImageNet
checkpoints), :data:`FPN_NAME_MAP`, :data:`HEAD_NAME_MAP` (keys relative to the head; an mmdet detector checkpoint
prefixes them with ``bbox_head.``), :data:`AUTHORS_HEAD_NAME_MAP` (fcjian/TOOD's head) and
:data:`MMDET_TOOD_NAME_MAP`, the whole detector.

Every tensor has the same shape and layout on both sides, so converting is renaming plus checking: a conversion
refuses with :class:`CheckpointMismatch`, naming the culprits, when a key has no rule or no place in the target,
when a target tensor is not supplied, or when a shape differs.
"""

import functools
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

__all__ = [
    "AUTHORS_HEAD_NAME_MAP",
    "CheckpointMismatch",
    "FPN_NAME_MAP",
    "HEAD_NAME_MAP",
    "MMDET_TOOD_NAME_MAP",
    "NameMap",
    "RESNET_NAME_MAP",
    "check_state_dict",
    "convert_head_state_dict_to_mmdet",
    "convert_mmdet_head_state_dict",
]

_INDEX = "{i}"


def _templates(name: str) -> Iterator[Tuple[str, Optional[str]]]:
    """``(template, index)``: the name itself, then each integer component of it in turn replaced by ``{i}``."""
    yield name, None
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            yield ".".join(parts[:k] + [_INDEX] + parts[k + 1 :]), part


class NameMap:
    """Renames parameters from another codebase's names ("theirs") to ours; :attr:`inverse` renames back.

    Built from ``(theirs, ours)`` name templates in which ``{i}``, as one whole dot-separated component, stands for
    a non-negative integer (a block, conv or level index) carried over unchanged. When several templates match a
    name the first pair wins.
    """

    def __init__(self, pairs: Iterable[Tuple[str, str]]):
        self.pairs: Tuple[Tuple[str, str], ...] = tuple(pairs)
        self._rules: Dict[str, Tuple[int, str]] = {}
        for rank, (theirs, ours) in enumerate(self.pairs):
            self._rules.setdefault(theirs, (rank, ours))

    def __call__(self, name: str) -> Optional[str]:
        """Our name for ``name``, or None when no template covers it."""
        hits = [(self._rules[t], index) for t, index in _templates(name) if t in self._rules]
        if not hits:
            return None
        (_, ours), index = min(hits, key=lambda hit: hit[0][0])
        return ours if index is None else ours.replace(_INDEX, index)

    def __add__(self, other: "NameMap") -> "NameMap":
        return NameMap(self.pairs + other.pairs)

    @functools.cached_property
    def inverse(self) -> "NameMap":
        """The map from our names to theirs."""
        return NameMap((ours, theirs) for theirs, ours in self.pairs)

    def prefixed(self, theirs: str, ours: str) -> "NameMap":
        """The same map for names under ``theirs`` / ``ours`` (e.g. "bbox_head." / "head.")."""
        return NameMap((theirs + t, ours + o) for t, o in self.pairs)

    def rename_state_dict(self, state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tuple[str, Tensor]], List[str]]:
        """Returns (our name -> (name as given, tensor), the given names no template covers)."""
        named, unknown = {}, []
        for key, tensor in state_dict.items():
            ours = self(key)
            if ours is None:
                unknown.append(key)
            else:
                named[ours] = (key, tensor)
        return named, unknown


_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _conv_bn(theirs_conv: str, theirs_bn: str, ours_conv: str) -> Iterator[Tuple[str, str]]:
    """A bias-free conv followed by BN (theirs) -> a Detectron2 ``Conv2d`` with its ``norm`` (ours)."""
    yield f"{theirs_conv}.weight", f"{ours_conv}.weight"
    for field in _BN_FIELDS:
        yield f"{theirs_bn}.{field}", f"{ours_conv}.norm.{field}"


def _resnet_pairs() -> Iterator[Tuple[str, str]]:
    yield from _conv_bn("conv1", "bn1", "stem.conv1")
    for stage in range(1, 5):
        theirs, ours = f"layer{stage}.{_INDEX}", f"res{stage + 1}.{_INDEX}"
        for j in (1, 2, 3):
            yield from _conv_bn(f"{theirs}.conv{j}", f"{theirs}.bn{j}", f"{ours}.conv{j}")
        yield from _conv_bn(f"{theirs}.downsample.0", f"{theirs}.downsample.1", f"{ours}.shortcut")
        # mmcv's DCNv2 (ModulatedDeformConv2dPack) holds its offset/mask conv inside the 3x3 conv.
        for param in ("weight", "bias"):
            yield f"{theirs}.conv2.conv_offset.{param}", f"{ours}.conv2_offset.{param}"


def _fpn_pairs() -> Iterator[Tuple[str, str]]:
    # start_level=1: mmdet's lateral / output conv i is level i + 3 (C3-C5); fpn_convs 3 and 4 are the extra
    # convs on P5 (add_extra_convs="on_output"), our top block's p6 and p7.
    outputs = [(f"fpn_convs.{i}", f"fpn_output{i + 3}") for i in range(3)]
    outputs += [("fpn_convs.3", "top_block.p6"), ("fpn_convs.4", "top_block.p7")]
    for theirs, ours in [(f"lateral_convs.{i}", f"fpn_lateral{i + 3}") for i in range(3)] + outputs:
        for param in ("weight", "bias"):
            yield f"{theirs}.conv.{param}", f"{ours}.{param}"


def _head_pairs() -> Iterator[Tuple[str, str]]:
    # mmcv's ConvModule names its conv "conv" and its GroupNorm "gn"; for a DCNv2 interactive conv, "conv" is mmcv's
    # ModulatedDeformConv2dPack with its own "conv_offset". Biases of convs appear only in heads without norm.
    for param in ("weight", "bias"):
        yield f"inter_convs.{_INDEX}.conv.{param}", f"inter_convs.{_INDEX}.{param}"
        yield f"inter_convs.{_INDEX}.conv.conv_offset.{param}", f"inter_convs.{_INDEX}.conv_offset.{param}"
        yield f"inter_convs.{_INDEX}.gn.{param}", f"inter_convs.{_INDEX}.norm.{param}"
    modules = [
        (f"{task}_decomp.{theirs}", f"{task}_decomp.{ours}")
        for task in ("cls", "reg")
        for theirs, ours in (
            ("layer_attention.0", "layer_attention.fc1"),
            ("layer_attention.2", "layer_attention.fc2"),
            ("reduction_conv.conv", "reduction"),
            ("reduction_conv.gn", "reduction.norm"),
        )
    ]
    modules += [
        ("tood_cls", "cls_score"),
        ("tood_reg", "bbox_pred"),
        ("cls_prob_module.0", "alignment_map.reduce"),
        ("cls_prob_module.2", "alignment_map.predict"),
        ("reg_offset_module.0", "offset_map.reduce"),
        ("reg_offset_module.2", "offset_map.predict"),
    ]
    for theirs, ours in modules:
        for param in ("weight", "bias"):
            yield f"{theirs}.{param}", f"{ours}.{param}"
    yield f"scales.{_INDEX}.scale", f"scales.{_INDEX}.scale"


RESNET_NAME_MAP = NameMap(_resnet_pairs())
"""torchvision's / mmdetection's ResNet and ResNeXt (``conv1``, ``bn1``, ``layerK.i.convJ`` / ``bnJ`` /
``downsample.{0,1}``, mmcv's ``conv2.conv_offset``) -> Detectron2's ResNet (``stem.conv1``, ``res{K+1}.i.convJ`` /
``convJ.norm`` / ``shortcut``, ``conv2_offset``)."""

FPN_NAME_MAP = NameMap(_fpn_pairs())
"""mmdetection's FPN over C3-C5 with P6/P7 on P5 -> Detectron2's FPN with TOOD's top block."""

HEAD_NAME_MAP = NameMap(_head_pairs())
"""mmdetection's TOODHead -> our :class:`tood.head.TOODHead` (keys relative to the head)."""

AUTHORS_HEAD_NAME_MAP = NameMap(
    (f"{authors}.{param}", HEAD_NAME_MAP(f"{mmdet}.{param}"))
    for authors, mmdet in (
        ("cls_decomp.la_conv1", "cls_decomp.layer_attention.0"),
        ("cls_decomp.la_conv2", "cls_decomp.layer_attention.2"),
        ("reg_decomp.la_conv1", "reg_decomp.layer_attention.0"),
        ("reg_decomp.la_conv2", "reg_decomp.layer_attention.2"),
        ("cls_prob_conv1", "cls_prob_module.0"),
        ("cls_prob_conv2", "cls_prob_module.2"),
        ("reg_offset_conv1", "reg_offset_module.0"),
        ("reg_offset_conv2", "reg_offset_module.2"),
    )
    for param in ("weight", "bias")
)
"""The head names in which the authors' code (fcjian/TOOD, mmdetection 2.14) differs from mmdetection's."""

MMDET_TOOD_NAME_MAP = (
    RESNET_NAME_MAP.prefixed("backbone.", "backbone.bottom_up.")
    + FPN_NAME_MAP.prefixed("neck.", "backbone.")
    + (HEAD_NAME_MAP + AUTHORS_HEAD_NAME_MAP).prefixed("bbox_head.", "head.")
)
"""A whole mmdetection (or fcjian/TOOD) TOOD detector -> our ``TOOD``; backwards it gives mmdetection's names."""


class CheckpointMismatch(ValueError):
    """Tensors that do not fit the target model.

    Attributes:
        unknown: names as given that have no rule, or no place in the target.
        missing: the target's names that nothing supplies.
        wrong_shape: ``"name (given shape) (expected shape)"``.
    """

    def __init__(
        self,
        what: str,
        unknown: Sequence[str] = (),
        missing: Sequence[str] = (),
        wrong_shape: Sequence[str] = (),
        *,
        noun: str = "tensors",
        mmdet_names: Optional[NameMap] = None,
        hint: str = "",
    ):
        """
        Args:
            what: what did not fit what, e.g. "the checkpoint (TOOD with ResNet-101) does not fit the model (...)".
            noun: what the message calls the entries ("tensors", "keys").
            mmdet_names: our name -> mmdetection's, to say what a missing tensor is called there.
            hint: what to do about it (a sentence).
        """
        self.unknown, self.missing, self.wrong_shape = list(unknown), list(missing), list(wrong_shape)

        def with_mmdet_name(name: str) -> str:
            theirs = mmdet_names(name) if mmdet_names is not None else None
            return name if theirs is None else f"{name} (mmdet: {theirs})"

        parts = [
            f"{label} ({len(names)}): {', '.join(names)}"
            for label, names in (
                (f"unknown {noun} (no rule, or no place in the target)", self.unknown),
                (f"missing {noun}", [with_mmdet_name(k) for k in self.missing]),
                ("wrong shapes", self.wrong_shape),
            )
            if names
        ]
        super().__init__(f"{what}: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def check_state_dict(
    what: str,
    named: Mapping[str, Tuple[str, Tensor]],
    unknown: Sequence[str],
    expected: Mapping[str, Tuple[int, ...]],
    **message,
) -> None:
    """Refuse a renamed state dict unless it supplies exactly the ``expected`` tensors with their shapes.

    Args:
        what: the start of the message (see :class:`CheckpointMismatch`).
        named: our name -> (name to report, tensor), e.g. from :meth:`NameMap.rename_state_dict`.
        unknown: names to report that have no rule.
        expected: our name -> shape, e.g. of the target model's state dict.
        message: ``noun``, ``mmdet_names``, ``hint`` of :class:`CheckpointMismatch`.

    Raises:
        CheckpointMismatch: listing every unknown (also: named but not expected), missing and wrongly shaped tensor.
    """
    unknown = list(unknown) + [given for ours, (given, _) in named.items() if ours not in expected]
    missing = [ours for ours in expected if ours not in named]
    wrong_shape = [
        f"{given} {tuple(t.shape)} (expected {expected[ours]})"
        for ours, (given, t) in named.items()
        if ours in expected and tuple(t.shape) != expected[ours]
    ]
    if unknown or missing or wrong_shape:
        raise CheckpointMismatch(what, sorted(unknown), sorted(missing), wrong_shape, **message)


def _check_head(
    direction: str,
    named: Mapping[str, Tuple[str, Tensor]],
    unknown: Sequence[str],
    reference: Union[nn.Module, Mapping[str, Tensor]],
) -> None:
    if isinstance(reference, nn.Module):
        reference = reference.state_dict()
    check_state_dict(
        f"cannot convert the TOOD head state dict {direction}",
        named,
        unknown,
        {k: tuple(v.shape) for k, v in reference.items()},
        noun="keys",
        mmdet_names=HEAD_NAME_MAP.inverse,
        hint="The head must have the checkpoint's number of classes, stacked convs, DCNv2 convs and levels",
    )


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
        CheckpointMismatch: listing unknown, missing (in our names) and wrongly shaped keys.
    """
    named, unknown = HEAD_NAME_MAP.rename_state_dict(state_dict)
    _check_head("from mmdet", named, unknown, reference)
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
        CheckpointMismatch: listing unknown, missing and wrongly shaped keys (in our names).
    """
    by_mmdet_name, unknown = HEAD_NAME_MAP.inverse.rename_state_dict(state_dict)
    _check_head("to mmdet", {ours: (ours, tensor) for ours, tensor in by_mmdet_name.values()}, unknown, reference)
    return {mmdet: tensor for mmdet, (_, tensor) in by_mmdet_name.items()}
