"""Convert mmdetection TOOD checkpoints (backbone, neck and head) to the names of our Detectron2 model.

Accepted: mmdetection 3.x checkpoints (``state_dict`` + ``meta`` with the config text in ``meta["cfg"]``), the
mmdetection 2.x model-zoo files (``meta["config"]``), the authors' mmdetection 2.14-era files (fcjian/TOOD, whose
head names its layer-attention and alignment convs differently) and bare state dicts of any of these.

The mapping (the tables of :mod:`tood.mmdet_names`), part by part:

* backbone (mmdet's ResNet / ResNeXt use torchvision's names): ``backbone.conv1`` / ``backbone.bn1`` ->
  ``backbone.bottom_up.stem.conv1(.norm)``; ``backbone.layerK.i.convJ`` / ``.bnJ`` -> ``resN.i.convJ(.norm)`` with
  N = K + 1; ``downsample.0`` / ``.1`` -> ``shortcut(.norm)``; mmcv's DCNv2 offset conv ``conv2.conv_offset`` ->
  ``conv2_offset`` (:class:`tood.backbone_dcn.DeformBottleneckBlock`); BN step counters are dropped.
* neck (mmdet's FPN, ``start_level=1``, ``add_extra_convs="on_output"``): ``lateral_convs.{0,1,2}`` ->
  ``fpn_lateral{3,4,5}``, ``fpn_convs.{0,1,2}`` -> ``fpn_output{3,4,5}``, ``fpn_convs.{3,4}`` -> ``top_block.p6/p7``.
* head: ``bbox_head.*`` -> ``head.*`` (:data:`tood.mmdet_names.HEAD_NAME_MAP`, and the authors' names).

Every tensor keeps its shape and values; a checkpoint with a tensor that has no place in the model, a missing
tensor or a wrong shape is refused with all culprits named.
"""

import ast
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from torch import Tensor, nn

from .backbone import LastLevelP6P7NoReLU
from .backbone_dcn import make_resnet_stages
from .head import TOODHead
from .mmdet_names import (
    AUTHORS_HEAD_NAME_MAP,
    MMDET_TOOD_NAME_MAP,
    RESNET_NAME_MAP,
    CheckpointMismatch,
    check_state_dict,
)

__all__ = [
    "CheckpointMismatch",
    "ConversionReport",
    "ResNetSpec",
    "convert_mmdet_checkpoint",
    "describe_resnet",
    "load_mmdet_checkpoint",
    "torchvision_resnet_to_detectron2",
]

# Tensors with no counterpart in a detection backbone: BN step counters and torchvision's ImageNet classifier.
_RESNET_DROPPED = re.compile(r"(.*\.)?num_batches_tracked\Z|fc\.(weight|bias)\Z")

# Parameters that identify other mmdetection detectors, to say what a refused checkpoint looks like.
_OTHER_DETECTORS: Tuple[Tuple[str, str], ...] = (
    ("bbox_head.retina_cls.weight", "RetinaNet (RetinaHead)"),
    ("bbox_head.atss_cls.weight", "ATSS (ATSSHead)"),
    ("bbox_head.gfl_cls.weight", "GFL (GFLHead)"),
    ("bbox_head.vfnet_cls.weight", "VarifocalNet (VFNetHead)"),
    ("bbox_head.conv_centerness.weight", "FCOS (FCOSHead)"),
    ("bbox_head.conv_cls.weight", "an anchor-based dense detector (AnchorHead)"),
    ("rpn_head.rpn_conv.weight", "a two-stage detector (RPN + RoI head)"),
)

_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_NUM_LEVELS = 5  # P3-P7
_STRIDES = (8, 16, 32, 64, 128)


@dataclass
class ResNetSpec:
    """The architecture of a bottleneck ResNet / ResNeXt as read from its tensors (arguments of
    :func:`tood.backbone_dcn.make_resnet_stages`)."""

    depth: int
    num_groups: int
    width_per_group: int
    deform_on_per_stage: Tuple[bool, bool, bool, bool]
    deform_num_groups: int

    def __str__(self) -> str:
        name = f"ResNeXt-{self.depth}-{self.num_groups}x{self.width_per_group}d" if self.num_groups > 1 else None
        name = name or f"ResNet-{self.depth}"
        dcn = [f"res{i + 2}" for i, on in enumerate(self.deform_on_per_stage) if on]
        if dcn:
            name += f", DCNv2 in {'/'.join(dcn)} ({self.deform_num_groups} deform group(s))"
        return name


@dataclass
class ConversionReport:
    """What :func:`convert_mmdet_checkpoint` found and mapped."""

    source: str  #: "mmdetection 3.x", "mmdetection 2.x", "fcjian/TOOD (mmdetection 2.14)" or "state dict"
    counts: Dict[str, int]  #: tensors mapped per part: backbone, neck, head
    dropped: List[str]  #: source tensors without a counterpart (BN step counters)
    backbone: ResNetSpec
    num_classes: int
    head_num_dcn: int
    #: "anchor_free" / "anchor_based" from the checkpoint's config text; None when it has none (the tensors are
    #: the same for both).
    anchor_type: Optional[str]
    class_names: Optional[List[str]] = None
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        anchor = self.anchor_type or "unknown (no config text in the checkpoint; the tensors do not tell)"
        lines = [
            f"source: {self.source}",
            f"backbone: {self.backbone}",
            f"head: {self.num_classes} classes, {self.head_num_dcn} DCNv2 interactive conv(s), anchor type {anchor}",
            "mapped tensors: "
            + ", ".join(f"{part} {n}" for part, n in self.counts.items())
            + f"; dropped {len(self.dropped)} (BN step counters)",
        ]
        return "\n".join(lines + self.notes)


def torchvision_resnet_to_detectron2(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename a torchvision-style ResNet / ResNeXt state dict (also mmdetection's ResNet) to Detectron2's names.

    Args:
        state_dict: ``conv1.weight``, ``bn1.*``, ``layerK.i.convJ.weight``, ``layerK.i.bnJ.*``,
            ``layerK.i.downsample.{0,1}.*``, optionally mmcv's DCNv2 ``layerK.i.conv2.conv_offset.*`` and
            torchvision's classifier ``fc.*``.

    Returns:
        Detectron2 ResNet names (``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ``res3.0.shortcut.weight``,
        ``res4.0.conv2_offset.weight``, ...) -> the same tensors; ``fc.*`` and ``num_batches_tracked`` are dropped.

    Raises:
        CheckpointMismatch: naming the keys that are not ResNet tensors.
    """
    named, unknown = RESNET_NAME_MAP.rename_state_dict(
        {k: v for k, v in state_dict.items() if not _RESNET_DROPPED.match(k)}
    )
    if unknown:
        raise CheckpointMismatch(
            "not a torchvision-style ResNet state dict",
            sorted(unknown),
            hint="Expected the tensors of torchvision's or mmdetection's ResNet / ResNeXt (conv1, bn1, "
            "layerK.i.convJ / bnJ / downsample.{0,1}, fc), as in torchvision's and open-mmlab's ImageNet checkpoints",
        )
    return {ours: tensor for ours, (_, tensor) in named.items()}


def describe_resnet(state_dict: Mapping[str, Tensor]) -> ResNetSpec:
    """Read depth, ResNeXt groups and DCN stages from a Detectron2-named bottleneck ResNet state dict.

    Args:
        state_dict: as returned by :func:`torchvision_resnet_to_detectron2` (keys relative to the ResNet).

    Raises:
        ValueError: when the blocks per stage are not those of ResNet-50, -101 or -152.
    """
    blocks = {}
    for key in state_dict:
        match = re.match(r"res([2-5])\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    layout = tuple(blocks.get(stage, 0) for stage in range(2, 6))
    needed = ("res2.0.conv1.weight", "res2.0.conv2.weight", "res2.0.conv3.weight")
    if layout not in _DEPTHS or any(k not in state_dict for k in needed):
        raise ValueError(
            f"unsupported backbone: blocks per stage {layout} (TOOD's configs use bottleneck ResNets with "
            f"{', '.join(f'{v}: {k}' for k, v in _DEPTHS.items())})"
        )
    width = state_dict["res2.0.conv1.weight"].shape[0]
    num_groups = width // state_dict["res2.0.conv2.weight"].shape[1]
    deform = tuple(any(k.startswith(f"res{s}.") and "conv2_offset" in k for k in state_dict) for s in range(2, 6))
    offset_channels = [v.shape[0] for k, v in state_dict.items() if k.endswith("conv2_offset.weight")]
    # A DCNv2 3x3 conv predicts (dy, dx, mask) for each of its 9 taps per deform group.
    deform_num_groups = offset_channels[0] // 27 if offset_channels else 1
    return ResNetSpec(_DEPTHS[layout], num_groups, width // num_groups, deform, deform_num_groups)


def _reference_model(backbone: ResNetSpec, head_args: Dict[str, Any]) -> nn.Module:
    """TOOD's backbone + head with the given architecture, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        stages = make_resnet_stages(
            backbone.depth,
            num_groups=backbone.num_groups,
            width_per_group=backbone.width_per_group,
            deform_on_per_stage=backbone.deform_on_per_stage,
            deform_num_groups=backbone.deform_num_groups,
            stride_in_1x1=False,
            norm="FrozenBN",
        )
        bottom_up = ResNet(BasicStem(3, 64, norm="FrozenBN"), stages, out_features=["res3", "res4", "res5"])
        fpn = FPN(bottom_up, ["res3", "res4", "res5"], 256, top_block=LastLevelP6P7NoReLU(256, 256, "p5"))
        head = TOODHead(
            input_shape=[ShapeSpec(channels=head_args.pop("in_channels"))] * _NUM_LEVELS, strides=_STRIDES, **head_args
        )
        return nn.ModuleDict({"backbone": fpn, "head": head})


def _head_args(head: Mapping[str, Tensor]) -> Dict[str, Any]:
    """TOODHead arguments read from an mmdet-named head state dict; mmdet's defaults for what is absent."""
    inter = [int(m.group(1)) for k in head for m in [re.match(r"inter_convs\.(\d+)\.conv\.weight\Z", k)] if m]
    dcn = {k: v for k, v in head.items() if re.match(r"inter_convs\.\d+\.conv\.conv_offset\.weight\Z", k)}
    cls = head.get("tood_cls.weight")
    first = head.get("inter_convs.0.conv.weight")
    return dict(
        num_classes=cls.shape[0] if cls is not None else 80,
        feat_channels=cls.shape[1] if cls is not None else 256,
        in_channels=first.shape[1] if first is not None else 256,
        stacked_convs=max(inter) + 1 if inter else 6,
        num_dcn=len(dcn),
        dcn_deform_groups=next(iter(dcn.values())).shape[0] // 27 if dcn else 4,
    )


def _model_config(meta: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The ``model`` dict of the config text mmdetection stores in ``meta`` (3.x: "cfg", 2.x: "config")."""
    text = meta.get("cfg") or meta.get("config")
    if not isinstance(text, str):
        return None

    def value(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            return {kw.arg: value(kw.value) for kw in node.keywords}
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(x) for x in node.elts]
        return ast.literal_eval(node)

    try:
        for statement in ast.parse(text).body:
            if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == ["model"]:
                return value(statement.value)
    except (SyntaxError, ValueError):
        pass
    return None


def _unwrap(checkpoint: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"not a checkpoint: expected a non-empty dict, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    meta = checkpoint.get("meta") if "state_dict" in checkpoint else None
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("not a checkpoint: its 'state_dict' is empty or not a dict")
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ValueError(
            "not an mmdetection checkpoint: expected a dict with 'state_dict' (+ 'meta') or a state dict of "
            f"tensors; these entries are not tensors: {', '.join(not_tensors[:20])}"
        )
    return dict(state_dict), dict(meta or {})


def _source(meta: Mapping[str, Any], head: Mapping[str, Tensor]) -> str:
    if any(AUTHORS_HEAD_NAME_MAP(k) is not None for k in head):
        return "fcjian/TOOD (mmdetection 2.14)"
    if "cfg" in meta:
        return "mmdetection 3.x"
    if "config" in meta or "mmdet_version" in meta:
        return f"mmdetection {meta.get('mmdet_version', '2.x')}"
    return "state dict (no meta)"


def _refuse_other_detectors(state_dict: Mapping[str, Tensor], model_cfg: Optional[Mapping[str, Any]]) -> None:
    if "bbox_head.tood_cls.weight" in state_dict:
        return
    looks_like = [name for key, name in _OTHER_DETECTORS if key in state_dict]
    if model_cfg and model_cfg.get("type") not in (None, "TOOD"):
        looks_like.insert(0, f"{model_cfg['type']} (its config says so)")
    prefixes = sorted({k.split(".")[0] for k in state_dict})
    what = f"it looks like {looks_like[0]}" if looks_like else "it has no bbox_head.tood_cls.weight"
    raise ValueError(f"not a TOOD checkpoint: {what}; top-level modules: {', '.join(prefixes)}")


def _describe_model(model: nn.Module) -> str:
    """E.g. "TOOD with ResNet-101, DCNv2 in res3/res4/res5 (1 deform group(s)), 80 classes"."""
    prefix = "backbone.bottom_up."
    resnet = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    try:
        backbone = str(describe_resnet(resnet))
    except ValueError as e:
        backbone = str(e)
    return f"TOOD with {backbone}, {model.head.num_classes} classes"


def convert_mmdet_checkpoint(
    checkpoint_or_state_dict: Mapping[str, Any], model: Optional[nn.Module] = None
) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Map an mmdetection TOOD checkpoint onto our model's parameter names.

    Args:
        checkpoint_or_state_dict: a loaded mmdetection checkpoint (``state_dict`` + ``meta``) or a bare state dict
            in mmdetection's names (``backbone.*``, ``neck.*``, ``bbox_head.*``).
        model: the TOOD model to load into (e.g. built from a config, on any device including "meta"). Names and
            shapes are checked against it, and a known anchor type against its head's. Without it they are
            checked against a TOOD model of the architecture read from the tensors.

    Returns:
        (state_dict, report): our names (``backbone.bottom_up.*``, ``backbone.fpn_*``, ``backbone.top_block.*``,
        ``head.*``) -> the checkpoint's tensors unchanged; loads with ``model.load_state_dict(state_dict)``
        (strict) and with Detectron2's checkpointer.

    Raises:
        CheckpointMismatch: unknown, missing or wrongly shaped tensors, all listed.
        ValueError: not a TOOD checkpoint (saying what it looks like), an unsupported backbone, or an anchor type
            that differs from ``model``'s.
    """
    state_dict, meta = _unwrap(checkpoint_or_state_dict)
    model_cfg = _model_config(meta)
    _refuse_other_detectors(state_dict, model_cfg)

    dropped = sorted(k for k in state_dict if k.endswith("num_batches_tracked"))
    kept = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    named, unknown = MMDET_TOOD_NAME_MAP.rename_state_dict(kept)
    # Head tensors are reported by their names in the checkpoint; backbone and neck tensors by ours, which say the
    # stage and level (res4.22, top_block.p6) that has no place for them.
    named = {ours: (given if given.startswith("bbox_head.") else ours, t) for ours, (given, t) in named.items()}
    prefix = "backbone.bottom_up."
    resnet = {k[len(prefix) :]: t for k, (_, t) in named.items() if k.startswith(prefix)}
    head = {k[len("bbox_head.") :]: v for k, v in state_dict.items() if k.startswith("bbox_head.")}

    spec = describe_resnet(resnet)
    head_args = _head_args(head)
    reference = model if model is not None else _reference_model(spec, dict(head_args))
    target = "a TOOD model of that architecture" if model is None else f"the model ({_describe_model(model)})"
    check_state_dict(
        f"the checkpoint (TOOD with {spec}, {head_args['num_classes']} classes) does not fit {target}",
        named,
        unknown,
        {k: tuple(v.shape) for k, v in reference.state_dict().items()},
        mmdet_names=MMDET_TOOD_NAME_MAP.inverse,
        hint="Convert for the config whose backbone (depth, ResNeXt groups, DCNv2 stages) and head (classes, DCNv2 "
        "convs) are the checkpoint's, or without a model to check against the architecture the tensors describe",
    )

    anchor_type = None
    if model_cfg is not None:
        # mmdetection's TOODHead defaults to anchor-free.
        anchor_type = model_cfg.get("bbox_head", {}).get("anchor_type", "anchor_free")
    if model is not None and anchor_type is not None and anchor_type != model.head.anchor_type:
        raise ValueError(
            f"the checkpoint's config trains an {anchor_type} head but the model's head is "
            f"{model.head.anchor_type}: the same tensors would decode boxes differently; use the matching config"
        )
    classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
    report = ConversionReport(
        source=_source(meta, head),
        counts={"backbone": len(resnet), "neck": sum(k.startswith("neck.") for k in state_dict), "head": len(head)},
        dropped=dropped,
        backbone=spec,
        num_classes=head_args["num_classes"],
        head_num_dcn=head_args["num_dcn"],
        anchor_type=anchor_type,
        class_names=list(classes) if classes else None,
    )
    if report.source.startswith("fcjian"):
        report.notes.append(
            "note: the authors' code uses the aligned box also where its corners crossed; this model, as "
            "mmdetection 3.x, keeps the unaligned box there, so such boxes can differ from the authors' outputs"
        )
    return {ours: tensor for ours, (_, tensor) in named.items()}, report


def load_mmdet_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint file with ``torch.load(weights_only=True)``: tensors and plain Python values only.

    Raises:
        ValueError: the file is empty, not a PyTorch file, or holds other Python objects.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
        # e.g. mmengine's message_hub objects in a checkpoint saved during training.
        raise ValueError(
            f"{path} holds Python objects other than tensors and plain values (e.g. {found.group(1)}), which are "
            "not loaded (unsafe): save its 'state_dict' alone (torch.save(torch.load(f)['state_dict'], out) where "
            "mmdetection is installed) and convert that"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
