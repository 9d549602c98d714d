"""tools/convert_torchvision_resnet.py: torchvision ImageNet weights become the exact backbone of TOOD's configs.

The weights are made here (random init, randomised BN statistics so that a wrong mapping shows); the
converted file is loaded by DetectionCheckpointer into the whole model built from the config, as
``train.init_checkpoint`` is, and the backbone must compute what torchvision's network computes.
"""

import pickle
import re
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from torch import nn

from tests.conftest import REPO_ROOT
from tests.conversion.test_conversion import open_mmlab_resnext_shapes

sys.path.insert(0, str(REPO_ROOT / "tools"))
from convert_torchvision_resnet import main  # noqa: E402


def _d2_name(key):
    """The naming rule, written independently: ``layer1.0.downsample.1.weight`` -> ``res2.0.shortcut.norm.weight``."""
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    if not key.startswith("res"):
        key = "stem." + key
    key = re.sub(r"bn(\d)\.", r"conv\1.norm.", key)
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def _random_torchvision_model(builder):
    model = builder(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                # Near-identity statistics keep deep activations in range while telling every tensor apart.
                m.weight.copy_(torch.empty(m.num_features).uniform_(0.8, 1.2, generator=g))
                m.bias.copy_(torch.empty(m.num_features).uniform_(-0.1, 0.1, generator=g))
                m.running_mean.copy_(torch.empty(m.num_features).uniform_(-0.1, 0.1, generator=g))
                m.running_var.copy_(torch.empty(m.num_features).uniform_(0.8, 1.2, generator=g))
    return model


def _torchvision_features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    c3 = model.layer2(model.layer1(x))
    c4 = model.layer3(c3)
    return {"res3": c3, "res4": c4, "res5": model.layer4(c4)}


def _convert_and_load(tmp_path, checkpoint, config, depth=None):
    """Convert ``checkpoint`` (what the .pth file holds) with the tool and load it as ``train.init_checkpoint`` is
    loaded into the model of ``config`` (with its ResNet depth changed to ``depth`` if given)."""
    src, dst = tmp_path / "imagenet.pth", tmp_path / "converted.pkl"
    torch.save(checkpoint, src)
    main([str(src), str(dst)])
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / config))
    cfg.model.num_classes = 3  # keep the head small; the backbone is what is under test
    if depth is not None:
        cfg.model.backbone.bottom_up.stages.depth = depth
    model = instantiate(cfg.model).eval()
    DetectionCheckpointer(model).load(str(dst))
    return model


def _assert_loaded(model, tv_model, expected_unloaded=()):
    """Every backbone tensor equals its torchvision counterpart, except ``expected_unloaded`` suffixes."""
    reference = {_d2_name(k): v for k, v in tv_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    unloaded = []
    for key, value in model.backbone.bottom_up.state_dict().items():
        if key in reference:
            torch.testing.assert_close(value, reference.pop(key), rtol=0, atol=0, msg=key)
        else:
            unloaded.append(key)
    assert all(k.endswith(expected_unloaded) for k in unloaded), unloaded
    # Only the classifier is left out of the backbone.
    assert sorted(reference) == ["stem.fc.bias", "stem.fc.weight"]


@pytest.mark.parametrize(
    "builder, config",
    [
        (torchvision.models.resnet50, "tood_R_50_1x.py"),
        pytest.param(torchvision.models.resnext101_64x4d, "tood_X_101_64x4d_2x_ms.py", marks=pytest.mark.slow),
    ],
    ids=["R-50", "X-101-64x4d"],
)
def test_converted_backbone_computes_torchvision_features(tmp_path, builder, config):
    tv_model = _random_torchvision_model(builder)
    model = _convert_and_load(tmp_path, tv_model.state_dict(), config)
    _assert_loaded(model, tv_model)
    _assert_computes_torchvision_features(model, tv_model)


def _assert_computes_torchvision_features(model, tv_model, size=(96, 128)):
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        expected = _torchvision_features(tv_model, x)
    for name in ("res3", "res4", "res5"):
        # FrozenBN applies the same (x - mean) / sqrt(var + eps) * w + b as BN in eval mode: only float rounding.
        scale = expected[name].abs().max()
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_dcn_backbone_takes_all_but_its_offset_convs(tmp_path):
    tv_model = _random_torchvision_model(torchvision.models.resnet101)
    model = _convert_and_load(tmp_path, tv_model.state_dict(), "tood_R_101_dcnv2_2x_ms.py")
    _assert_loaded(model, tv_model, expected_unloaded=("conv2_offset.weight", "conv2_offset.bias"))
    # The deformable stages c3-c5 really are deformable (and their offset convs start at zero).
    offsets = [k for k, v in model.backbone.bottom_up.state_dict().items() if "conv2_offset" in k]
    assert offsets and all(k.split(".")[0] in ("res3", "res4", "res5") for k in offsets)


def test_open_mmlab_resnext_checkpoint_initialises_the_x101_config(tmp_path):
    """open-mmlab's ImageNet ResNeXt-64x4d file (the reference's init of its X-101 configs), with mmcv's
    "state_dict" wrapper or without, converts into the backbone of configs/tood_X_101_64x4d_2x_ms.py, which then
    computes what torchvision's ResNeXt computes with the same weights. At depth 50 to stay fast: the renaming does
    not depend on the depth, and test_conversion checks every name and shape at depth 101."""
    tv_model = _random_torchvision_model(
        lambda weights: torchvision.models.resnet.ResNet(
            torchvision.models.resnet.Bottleneck, [3, 4, 6, 3], groups=64, width_per_group=4
        )
    )
    open_mmlab = {k: v for k, v in tv_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in open_mmlab.items()} == open_mmlab_resnext_shapes(50)

    model = _convert_and_load(tmp_path, {"state_dict": open_mmlab}, "tood_X_101_64x4d_2x_ms.py", depth=50)
    _assert_loaded(model, tv_model)
    # 64 groups make CPU convolutions slow: a small input (res5 is 2 x 2).
    _assert_computes_torchvision_features(model, tv_model, size=(64, 64))
    # The bare state dict gives the same file.
    with open(tmp_path / "converted.pkl", "rb") as f:
        wrapped = pickle.load(f)["model"]
    torch.save(open_mmlab, tmp_path / "bare.pth")
    main([str(tmp_path / "bare.pth"), str(tmp_path / "bare.pkl")])
    with open(tmp_path / "bare.pkl", "rb") as f:
        bare = pickle.load(f)["model"]
    assert bare.keys() == wrapped.keys() and all(np.array_equal(bare[k], wrapped[k]) for k in bare)


def test_checkpoint_wrappers_are_unwrapped(tmp_path):
    state = {"module.conv1.weight": torch.ones(2, 3, 1, 1), "module.fc.weight": torch.ones(1, 2)}
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    main([str(tmp_path / "wrapped.pth"), str(tmp_path / "out.pkl")])
    with open(tmp_path / "out.pkl", "rb") as f:
        data = pickle.load(f)
    assert list(data["model"]) == ["stem.conv1.weight"]
    assert data["matching_heuristics"] is True
