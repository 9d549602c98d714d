"""Conversion of mmdetection TOOD checkpoints: names, shapes, architecture detection and refusals.

The checkpoints are built here: the reference detector's own state dict (mmdetection's names, from the e2e oracle),
and synthetic state dicts laid out as mmdetection's ResNet / ResNeXt / FPN create their parameters (zero-stride
tensors: right shapes, no memory), checked against the models of the zoo configs built on the meta device.
"""

import copy
import math

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from tests.conftest import REPO_ROOT, load_tool
from tood.conversion import (
    CheckpointMismatch,
    convert_mmdet_checkpoint,
    load_mmdet_checkpoint,
    torchvision_resnet_to_detectron2,
)

pytestmark = pytest.mark.reference_threads  # compares with tensors recorded from mmdetection

tool = load_tool("convert_mmdet_to_d2")
_SKELETONS = {}


def skeleton(config: str) -> torch.nn.Module:
    """The model of ``configs/<config>.py`` on the meta device (cached; never loaded into)."""
    if config not in _SKELETONS:
        _SKELETONS[config] = tool.build_model_skeleton(str(REPO_ROOT / "configs" / f"{config}.py"))
    return _SKELETONS[config]


def _shape_only(shape):
    return torch.zeros(()).expand(shape)


def mmdet_resnet_shapes(depth, groups=1, base_width=64, dcn_stages=(), deform_groups=1):
    """Parameter names and shapes of mmdetection's ResNet (groups == 1) / ResNeXt, style "pytorch", as built by
    ``mmdet.models.backbones.ResNet`` / ``ResNeXt`` (BN step counters included)."""
    shapes = {}

    def conv_bn(conv, bn, out_channels, in_channels, k, groups=1):
        shapes[f"{conv}.weight"] = (out_channels, in_channels // groups, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (out_channels,)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", 64, 3, 7)
    inplanes = 64
    for stage, num_blocks in enumerate({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]):
        planes = 64 * 2**stage
        width = planes if groups == 1 else math.floor(planes * base_width / 64) * groups
        for block in range(num_blocks):
            prefix = f"layer{stage + 1}.{block}."
            in_channels = inplanes if block == 0 else planes * 4
            conv_bn(prefix + "conv1", prefix + "bn1", width, in_channels, 1)
            conv_bn(prefix + "conv2", prefix + "bn2", width, width, 3, groups)
            if stage in dcn_stages:
                shapes[prefix + "conv2.conv_offset.weight"] = (27 * deform_groups, width, 3, 3)
                shapes[prefix + "conv2.conv_offset.bias"] = (27 * deform_groups,)
            conv_bn(prefix + "conv3", prefix + "bn3", planes * 4, width, 1)
            if block == 0:
                conv_bn(prefix + "downsample.0", prefix + "downsample.1", planes * 4, in_channels, 1)
        inplanes = planes * 4
    return shapes


def mmdet_fpn_shapes():
    """mmdetection's FPN(in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1, num_outs=5,
    add_extra_convs="on_output")."""
    shapes = {}
    for i, in_channels in enumerate((512, 1024, 2048)):
        shapes[f"lateral_convs.{i}.conv.weight"] = (256, in_channels, 1, 1)
        shapes[f"lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        shapes[f"fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        shapes[f"fpn_convs.{i}.conv.bias"] = (256,)
    return shapes


def mmdet_tood_head_shapes(num_dcn=0, num_classes=80, feat_channels=256, stacked_convs=6, dcn_deform_groups=4):
    """mmdetection 3.3's ``TOODHead`` (``mmdet/models/dense_heads/tood_head.py``) with GN: the stacked
    ``ConvModule`` convs (no bias beside a norm; the first ``num_dcn`` are mmcv's ``ModulatedDeformConv2dPack``
    with ``deform_groups=4`` and their own ``conv_offset``), two ``TaskDecomposition`` modules (layer attention
    down to ``feat_channels // 8``), the prediction convs, the probability and offset branches, one scale per level.
    Written from those modules' definitions, not from this project's name map."""
    shapes, stacked = {}, feat_channels * stacked_convs
    for i in range(stacked_convs):
        shapes[f"inter_convs.{i}.conv.weight"] = (feat_channels, feat_channels, 3, 3)
        if i < num_dcn:
            shapes[f"inter_convs.{i}.conv.conv_offset.weight"] = (dcn_deform_groups * 27, feat_channels, 3, 3)
            shapes[f"inter_convs.{i}.conv.conv_offset.bias"] = (dcn_deform_groups * 27,)
        shapes[f"inter_convs.{i}.gn.weight"] = shapes[f"inter_convs.{i}.gn.bias"] = (feat_channels,)
    for task in ("cls_decomp", "reg_decomp"):
        shapes[f"{task}.layer_attention.0.weight"] = (feat_channels // 8, stacked, 1, 1)
        shapes[f"{task}.layer_attention.0.bias"] = (feat_channels // 8,)
        shapes[f"{task}.layer_attention.2.weight"] = (stacked_convs, feat_channels // 8, 1, 1)
        shapes[f"{task}.layer_attention.2.bias"] = (stacked_convs,)
        shapes[f"{task}.reduction_conv.conv.weight"] = (feat_channels, stacked, 1, 1)
        shapes[f"{task}.reduction_conv.gn.weight"] = shapes[f"{task}.reduction_conv.gn.bias"] = (feat_channels,)
    for name, out_channels in (("tood_cls", num_classes), ("tood_reg", 4)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_channels, feat_channels, 3, 3), (out_channels,)
    for name, out_channels in (("cls_prob_module", 1), ("reg_offset_module", 8)):
        shapes[f"{name}.0.weight"], shapes[f"{name}.0.bias"] = (
            (feat_channels // 4, stacked, 1, 1),
            (feat_channels // 4,),
        )
        shapes[f"{name}.2.weight"] = (out_channels, feat_channels // 4, 3, 3)
        shapes[f"{name}.2.bias"] = (out_channels,)
    shapes.update({f"scales.{level}.scale": () for level in range(5)})
    return shapes


def test_head_names_are_mmdetection_s(e2e_oracle):
    """The head names written above are those of the checkpoint mmdetection 3.3 saved."""
    saved = {k[len("bbox_head.") :]: tuple(v.shape) for k, v in e2e_oracle["state_dict"].items() if "bbox_head." in k}
    assert saved == mmdet_tood_head_shapes()


def synthetic_mmdet_checkpoint(config: str, head_dcn: int = 0, **resnet) -> dict:
    """An mmdetection-named TOOD state dict for the architecture of ``config``, with ``head_dcn`` DCNv2 head convs."""
    state_dict = {f"backbone.{k}": _shape_only(s) for k, s in mmdet_resnet_shapes(**resnet).items()}
    state_dict.update({f"neck.{k}": _shape_only(s) for k, s in mmdet_fpn_shapes().items()})
    state_dict.update({f"bbox_head.{k}": _shape_only(s) for k, s in mmdet_tood_head_shapes(head_dcn).items()})
    return state_dict


ZOO = [
    # config, ResNet arguments, expected description, DCNv2 convs in the head
    ("tood_R_50_1x", dict(depth=50), "ResNet-50", 0),
    ("tood_R_101_2x_ms", dict(depth=101), "ResNet-101", 0),
    ("tood_R_101_dcnv2_2x_ms", dict(depth=101, dcn_stages=(1, 2, 3)), "ResNet-101, DCNv2 in res3/res4/res5", 2),
    ("tood_X_101_64x4d_2x_ms", dict(depth=101, groups=64, base_width=4), "ResNeXt-101-64x4d", 0),
    (
        "tood_X_101_64x4d_dcnv2_2x_ms",
        dict(depth=101, groups=64, base_width=4, dcn_stages=(2, 3)),
        "ResNeXt-101-64x4d, DCNv2 in res4/res5",
        2,
    ),
]


@pytest.mark.parametrize("config, resnet, description, head_dcn", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_architectures_are_detected_and_fit_their_config(config, resnet, description, head_dcn):
    state_dict = synthetic_mmdet_checkpoint(config, head_dcn, **resnet)
    model = skeleton(config)
    converted, report = convert_mmdet_checkpoint(state_dict, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert str(report.backbone).startswith(description)
    assert report.head_num_dcn == head_dcn
    # Without a model the same architecture is read from the tensors alone.
    _, report_alone = convert_mmdet_checkpoint(state_dict)
    assert report_alone.backbone == report.backbone
    assert report.anchor_type is None  # a bare state dict does not say
    assert len(report.dropped) == sum(k.endswith("num_batches_tracked") for k in state_dict)
    assert sum(report.counts.values()) + len(report.dropped) == len(state_dict)


def test_checkpoint_of_another_depth_is_refused_naming_both_architectures():
    state_dict = synthetic_mmdet_checkpoint("tood_R_101_2x_ms", depth=101)
    with pytest.raises(CheckpointMismatch) as excinfo:
        convert_mmdet_checkpoint(state_dict, skeleton("tood_R_50_1x"))
    message = str(excinfo.value)
    assert "ResNet-101" in message and "ResNet-50" in message
    assert "backbone.bottom_up.res4.22.conv3.weight" in excinfo.value.unknown
    assert not excinfo.value.missing


def test_torchvision_resnets_map_onto_detectron2_resnets():
    """torchvision's own modules give the names; Detectron2's ResNets of the configs must take them all."""
    for config, build in (
        ("tood_R_50_1x", torchvision.models.resnet50),
        ("tood_X_101_64x4d_2x_ms", torchvision.models.resnext101_64x4d),
    ):
        with torch.device("meta"):
            torchvision_state = build().state_dict()
        converted = torchvision_resnet_to_detectron2(torchvision_state)
        prefix = "backbone.bottom_up."
        expected = {k[len(prefix) :]: tuple(v.shape) for k, v in skeleton(config).state_dict().items() if prefix in k}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    with pytest.raises(CheckpointMismatch, match="avgpool.weight"):
        torchvision_resnet_to_detectron2({**torchvision_state, "avgpool.weight": torch.zeros(1)})


def open_mmlab_resnext_shapes(depth):
    """Names and shapes of open-mmlab's ImageNet ResNeXt-64x4d (``open-mmlab://resnext101_64x4d``, the reference's
    initialisation of its X-101 configs): the official ResNeXt release converted to mmdetection's ResNeXt, whose
    names are torchvision's; no BN step counters, and the ImageNet classifier, which an ImageNet file may carry."""
    shapes = mmdet_resnet_shapes(depth, groups=64, base_width=4)
    shapes = {k: s for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    return {**shapes, "fc.weight": (1000, 2048), "fc.bias": (1000,)}


def test_open_mmlab_resnext101_64x4d_maps_onto_the_x101_configs():
    shapes = open_mmlab_resnext_shapes(101)
    assert shapes["layer1.0.conv2.weight"] == (256, 4, 3, 3)  # 64 groups of 4 channels
    # torchvision's ResNeXt-101 64x4d has exactly these tensors (and BN step counters): a numerical reference.
    with torch.device("meta"):
        torchvision_state = torchvision.models.resnext101_64x4d().state_dict()
    assert {k: tuple(v.shape) for k, v in torchvision_state.items() if "num_batches" not in k} == shapes

    converted = torchvision_resnet_to_detectron2({k: _shape_only(s) for k, s in shapes.items()})
    prefix = "backbone.bottom_up."
    for config in ("tood_X_101_64x4d_2x_ms", "tood_X_101_64x4d_dcnv2_2x_ms"):
        expected = {
            k[len(prefix) :]: tuple(v.shape)
            for k, v in skeleton(config).state_dict().items()
            if k.startswith(prefix) and "conv2_offset" not in k  # DCNv2 offset convs start at zero
        }
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected, config


@pytest.fixture(scope="module")
def oracle_checkpoint(e2e_oracle):
    """The reference detector's checkpoint (state_dict + meta) as mmdetection 3.3 saved it."""
    return {"state_dict": e2e_oracle["state_dict"], "meta": e2e_oracle["meta"]}


def test_reference_checkpoint_converts_and_loads_strictly(oracle_checkpoint, tmp_path):
    source = tmp_path / "mmdet.pth"
    torch.save(oracle_checkpoint, source)
    output = tmp_path / "d2.pth"
    config = str(REPO_ROOT / "configs/tood_R_50_1x.py")
    assert tool.main(["--input", str(source), "--output", str(output), "--config", config]) == 0

    cfg = LazyConfig.load(config)
    cfg.model.tal_start_iter = 0
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(output))
    saved = torch.load(output, weights_only=True)
    assert saved["matching_heuristics"] is False
    model_state = model.state_dict()
    assert set(saved["model"]) == set(model_state)
    for key, value in saved["model"].items():
        assert torch.equal(model_state[key], value.float()), key

    # Every source tensor is accounted for: mapped, or a BN step counter.
    _, report = convert_mmdet_checkpoint(oracle_checkpoint)
    source_sd = oracle_checkpoint["state_dict"]
    assert report.counts["head"] == sum(k.startswith("bbox_head.") for k in source_sd)
    assert report.counts["neck"] == sum(k.startswith("neck.") for k in source_sd)
    assert report.dropped == sorted(k for k in source_sd if k.endswith("num_batches_tracked"))
    assert report.source == "mmdetection 3.x"
    assert report.anchor_type == oracle_checkpoint["meta"]["oracle"]["anchor_type"]
    assert report.class_names == list(oracle_checkpoint["meta"]["dataset_meta"]["classes"])
    assert str(report.backbone) == "ResNet-50"
    # Spot checks of the mapping against the source tensors.
    converted, _ = convert_mmdet_checkpoint(oracle_checkpoint)
    pairs = {
        "backbone.layer3.5.bn2.running_var": "backbone.bottom_up.res4.5.conv2.norm.running_var",
        "backbone.layer2.0.downsample.0.weight": "backbone.bottom_up.res3.0.shortcut.weight",
        "backbone.bn1.weight": "backbone.bottom_up.stem.conv1.norm.weight",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral3.weight",
        "neck.fpn_convs.2.conv.bias": "backbone.fpn_output5.bias",
        "neck.fpn_convs.4.conv.weight": "backbone.top_block.p7.weight",
        "bbox_head.cls_prob_module.2.bias": "head.alignment_map.predict.bias",
    }
    for theirs, ours in pairs.items():
        assert converted[ours] is source_sd[theirs]


def test_authors_checkpoint_names_are_accepted(oracle_checkpoint):
    """fcjian/TOOD (mmdetection 2.14) names the layer-attention and alignment convs differently."""
    authors_names = {
        "cls_decomp.layer_attention.0.": "cls_decomp.la_conv1.",
        "cls_decomp.layer_attention.2.": "cls_decomp.la_conv2.",
        "reg_decomp.layer_attention.0.": "reg_decomp.la_conv1.",
        "reg_decomp.layer_attention.2.": "reg_decomp.la_conv2.",
        "cls_prob_module.0.": "cls_prob_conv1.",
        "cls_prob_module.2.": "cls_prob_conv2.",
        "reg_offset_module.0.": "reg_offset_conv1.",
        "reg_offset_module.2.": "reg_offset_conv2.",
    }
    authors = {}
    for key, value in oracle_checkpoint["state_dict"].items():
        for mmdet, theirs in authors_names.items():
            key = key.replace(f"bbox_head.{mmdet}", f"bbox_head.{theirs}")
        authors[key] = value
    assert sum(k != j for k, j in zip(authors, oracle_checkpoint["state_dict"])) == 16
    meta = {"mmdet_version": "2.14.0", "config": "model = dict(type='TOOD', bbox_head=dict(type='TOODHead'))"}
    converted, report = convert_mmdet_checkpoint({"state_dict": authors, "meta": meta})
    expected, _ = convert_mmdet_checkpoint(oracle_checkpoint)
    assert converted.keys() == expected.keys()
    assert all(converted[k] is expected[k] for k in expected)
    assert report.source.startswith("fcjian/TOOD")
    assert report.anchor_type == "anchor_free"  # mmdetection's default when the config does not set it


def test_anchor_type_from_config_text_must_match_the_model(oracle_checkpoint):
    meta = {
        "mmdet_version": "2.20.0",
        "CLASSES": ("a", "b"),
        "config": "model = dict(\n    type='TOOD',\n    bbox_head=dict(type='TOODHead', anchor_type='anchor_based'))\n",
    }
    checkpoint = {"state_dict": oracle_checkpoint["state_dict"], "meta": meta}
    _, report = convert_mmdet_checkpoint(checkpoint, skeleton("tood_R_50_anchor_based_1x"))
    assert report.anchor_type == "anchor_based" and report.source == "mmdetection 2.20.0"
    assert report.class_names == ["a", "b"]
    with pytest.raises(ValueError, match="anchor_based head but the model's head is anchor_free"):
        convert_mmdet_checkpoint(checkpoint, skeleton("tood_R_50_1x"))


def test_unknown_missing_and_misshapen_tensors_are_all_named(oracle_checkpoint):
    state_dict = dict(oracle_checkpoint["state_dict"])
    state_dict["bbox_head.extra_conv.weight"] = torch.zeros(1)
    state_dict["neck.fpn_convs.5.conv.weight"] = torch.zeros(1)
    state_dict["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(1)
    del state_dict["backbone.layer3.2.conv2.weight"]
    del state_dict["bbox_head.tood_reg.bias"]
    state_dict["backbone.layer1.0.conv1.weight"] = torch.zeros(64, 63, 1, 1)
    state_dict["bbox_head.tood_cls.weight"] = torch.zeros(81, 256, 3, 3)
    with pytest.raises(CheckpointMismatch) as excinfo:
        convert_mmdet_checkpoint(state_dict, skeleton("tood_R_50_1x"))
    error = excinfo.value
    assert error.unknown == [
        "bbox_head.extra_conv.weight",
        "neck.fpn_convs.5.conv.weight",
        "roi_head.bbox_head.fc_cls.weight",
    ]
    assert len(error.missing) == 2
    assert error.missing[0] == "backbone.bottom_up.res4.2.conv2.weight"
    assert error.missing[1].startswith("head.bbox_pred.bias")
    assert len(error.wrong_shape) == 2
    assert any(s.startswith("bbox_head.tood_cls.weight (81, 256, 3, 3)") for s in error.wrong_shape)
    assert any(s.startswith("backbone.bottom_up.res2.0.conv1.weight (64, 63, 1, 1)") for s in error.wrong_shape)
    for name in error.unknown + error.missing:
        assert name in str(error)


def test_fpn_with_extra_convs_on_the_input_is_refused(oracle_checkpoint):
    """RetinaNet-style FPN (P6 from C5) has the same names as TOOD's (P6 from P5) but other shapes."""
    state_dict = dict(oracle_checkpoint["state_dict"])
    state_dict["neck.fpn_convs.3.conv.weight"] = torch.zeros(256, 2048, 3, 3)
    with pytest.raises(CheckpointMismatch, match=r"backbone.top_block.p6.weight \(256, 2048, 3, 3\)"):
        convert_mmdet_checkpoint(state_dict)


def test_other_detectors_are_refused_saying_what_they_look_like(oracle_checkpoint):
    body = {k: v for k, v in oracle_checkpoint["state_dict"].items() if not k.startswith("bbox_head.")}
    retinanet = {
        **body,
        "bbox_head.cls_convs.0.conv.weight": torch.zeros(256, 256, 3, 3),
        "bbox_head.retina_cls.weight": torch.zeros(720, 256, 3, 3),
        "bbox_head.retina_reg.weight": torch.zeros(36, 256, 3, 3),
    }
    with pytest.raises(ValueError, match=r"not a TOOD checkpoint: it looks like RetinaNet"):
        convert_mmdet_checkpoint(retinanet)
    atss = {**body, "bbox_head.atss_cls.weight": torch.zeros(80, 256, 3, 3)}
    with pytest.raises(ValueError, match=r"it looks like ATSS"):
        convert_mmdet_checkpoint(atss)
    unknown_head = {**body, "bbox_head.foo.weight": torch.zeros(1)}
    meta = {"cfg": "model = dict(type='PAA', bbox_head=dict(type='PAAHead'))"}
    with pytest.raises(ValueError, match=r"it looks like PAA \(its config says so\)"):
        convert_mmdet_checkpoint({"state_dict": unknown_head, "meta": meta})


def test_unreadable_files_are_refused(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (empty, garbage, tmp_path / "absent.pth"):
        with pytest.raises(ValueError, match="cannot read"):
            load_mmdet_checkpoint(str(path))
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "meta": {"hub": torch.nn.Identity()}}, objects)
    with pytest.raises(ValueError, match="holds Python objects other than tensors"):
        load_mmdet_checkpoint(str(objects))


def test_non_checkpoints_are_refused():
    for obj, match in (
        ({}, "not a checkpoint"),
        ([1, 2], "not a checkpoint"),
        ({"state_dict": {}}, "empty"),
        ({"epoch": 3, "lr": 0.1}, "not tensors: epoch, lr"),
    ):
        with pytest.raises(ValueError, match=match):
            convert_mmdet_checkpoint(obj)


def test_tool_refuses_with_the_mismatches_named(oracle_checkpoint, tmp_path, capsys):
    state_dict = copy.copy(oracle_checkpoint["state_dict"])
    del state_dict["neck.fpn_convs.3.conv.bias"]
    source = tmp_path / "broken.pth"
    torch.save({"state_dict": state_dict, "meta": oracle_checkpoint["meta"]}, source)
    output = tmp_path / "out.pth"
    config = str(REPO_ROOT / "configs/tood_R_50_1x.py")
    assert tool.main(["--input", str(source), "--output", str(output), "--config", config]) == 1
    assert "missing tensors (1): backbone.top_block.p6.bias" in capsys.readouterr().err
    assert not output.exists()
