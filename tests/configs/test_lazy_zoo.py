"""Every LazyConfig of configs/ builds and trains a step on CPU; schedules, optimizer, data pipelines and the
deformable backbone are the reference's (mmdetection 3.3's configs/tood/)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.resnet import BottleneckBlock
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import deform_conv2d

from tests.conftest import REPO_ROOT
from tood.backbone_dcn import DeformBottleneckBlock
from tood.data import register_shapes_dataset
from tood.engine.config_checks import set_epoch_length
from tood.layers import ModulatedDeformConv2d, deform_conv2d_by_sampling

CONFIG_DIR = REPO_ROOT / "configs"
MODEL_ZOO = [
    "tood_R_50_1x.py",
    "tood_R_50_anchor_based_1x.py",
    "tood_R_50_2x_ms.py",
    "tood_R_101_2x_ms.py",
    "tood_R_101_dcnv2_2x_ms.py",
    "tood_X_101_64x4d_2x_ms.py",
    "tood_X_101_64x4d_dcnv2_2x_ms.py",
]
ALL_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.py"))


QUICKSTART_CONFIGS = {"quickstart_shapes.py", "quickstart_shapes_retinanet.py", "quickstart_shapes_fcos.py"}


def load(name):
    return LazyConfig.load(str(CONFIG_DIR / name))


def make_batch(num_classes, size=128, num_images=1):
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(num_images):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[0.08, 0.1, 0.55, 0.47], [0.4, 0.3, 0.94, 0.98]]) * size)
        inst.gt_classes = torch.tensor([0, num_classes - 1])
        batch.append({"image": torch.randint(0, 256, (3, size, size), generator=g).float(), "instances": inst})
    return batch


def test_the_published_model_zoo_is_there():
    assert set(MODEL_ZOO) | QUICKSTART_CONFIGS == set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_builds_and_trains_one_step(name):
    """One optimizer step on a small image: finite losses, gradients in the head and the trainable backbone only."""
    cfg = load(name)
    model = instantiate(cfg.model)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # The 101-layer backbones (64 groups for ResNeXt) are slow on CPU: 64 px keeps them to seconds.
    size = 64 if "101" in name else 128
    with EventStorage(0):
        losses = model(make_batch(cfg.model.num_classes, size=size))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    optimizer.zero_grad()
    total.backward()
    optimizer.step()

    params = dict(model.named_parameters())
    assert params["head.cls_score.weight"].grad.abs().sum() > 0
    assert params["backbone.bottom_up.res5.0.conv1.weight"].grad.abs().sum() > 0
    frozen_at = cfg.model.backbone.bottom_up.freeze_at
    stem = [p for k, p in params.items() if k.startswith("backbone.bottom_up.stem.")]
    assert all(p.requires_grad == (frozen_at == 0) for p in stem)
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    if name.startswith("quickstart"):
        # AdamW spares the norms.
        assert decays == {cfg.optimizer.weight_decay, 0.0}
    else:
        # mmdetection's SGD decays every parameter, norms and biases included.
        assert decays == {cfg.optimizer.weight_decay}


@pytest.mark.parametrize(
    "name, depth, groups, deformable_stages, num_dcn",
    [
        ("tood_R_50_1x.py", 50, 1, [], 0),
        ("tood_R_101_2x_ms.py", 101, 1, [], 0),
        ("tood_R_101_dcnv2_2x_ms.py", 101, 1, ["res3", "res4", "res5"], 2),
        ("tood_X_101_64x4d_2x_ms.py", 101, 64, [], 0),
        ("tood_X_101_64x4d_dcnv2_2x_ms.py", 101, 64, ["res4", "res5"], 2),
    ],
)
def test_backbone_and_head_variants(name, depth, groups, deformable_stages, num_dcn):
    cfg = load(name)
    cfg.model.num_classes = 2
    with torch.device("meta"):  # structure only: no memory or initialisation
        model = instantiate(cfg.model)
    bottom_up = model.backbone.bottom_up
    blocks = [b for stage in ("res2", "res3", "res4", "res5") for b in getattr(bottom_up, stage)]
    assert len(blocks) == {50: 16, 101: 33}[depth]
    for stage in ("res2", "res3", "res4", "res5"):
        first = getattr(bottom_up, stage)[0]
        assert isinstance(first, DeformBottleneckBlock) == (stage in deformable_stages), stage
        # torchvision style: the stride is in the 3x3 conv; ResNeXt 64x4d: 64 groups of width 4 at res2.
        assert first.conv1.stride == (1, 1)
        assert first.conv2.weight.shape[1] * groups == first.conv1.out_channels
    assert bottom_up.res2[0].conv1.out_channels == groups * (4 if groups > 1 else 64)
    dcn_head_convs = [type(c).__name__ == "ModulatedDeformConv2d" for c in model.head.inter_convs]
    assert dcn_head_convs == [True] * num_dcn + [False] * (6 - num_dcn)


@pytest.mark.parametrize(
    "name, max_iter, steps, tal_start",
    [
        # One epoch: ceil(117266 COCO train2017 images with boxes / batch 16) = 7330 iterations.
        ("tood_R_50_1x.py", 87960, (58640, 80630), 29320),  # epochs 8 and 11 of 12, warm-up 4 epochs
        ("tood_R_50_anchor_based_1x.py", 87960, (58640, 80630), 29320),
        ("tood_R_50_2x_ms.py", 175920, (117280, 161260), 29320),  # epochs 16 and 22 of 24, warm-up 4 epochs
        ("tood_X_101_64x4d_dcnv2_2x_ms.py", 175920, (117280, 161260), 29320),
    ],
)
def test_schedule_and_optimizer(name, max_iter, steps, tal_start):
    cfg = load(name)
    assert cfg.train.max_iter == max_iter
    assert cfg.model.tal_start_iter == tal_start
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.dataloader.train.total_batch_size == 16
    multiplier = instantiate(cfg.lr_multiplier)

    def lr(it):  # how Detectron2's LRScheduler hook evaluates the multiplier
        return multiplier(it / max_iter)

    assert lr(0) == pytest.approx(0.001)
    # Linear warm-up as mmengine's LinearLR(end=500): the full rate at iteration 499.
    assert lr(250) == pytest.approx(0.001 + 0.999 * 250 / 499)
    assert lr(498) < 1.0
    assert lr(499) == pytest.approx(1.0)
    assert lr(steps[0] - 1) == pytest.approx(1.0)
    assert lr(steps[0]) == pytest.approx(0.1)
    assert lr(steps[1] - 1) == pytest.approx(0.1)
    assert lr(steps[1]) == pytest.approx(0.01)
    assert lr(max_iter - 1) == pytest.approx(0.01)


def _resized_shapes(augmentations, h, w, n=1):
    augs = [a for a in instantiate(augmentations)]
    image = np.zeros((h, w, 3), dtype=np.uint8)
    shapes = set()
    for _ in range(n):
        t = augs[0].get_transform(image)
        shapes.add((t.new_h, t.new_w))
    return shapes


def test_data_pipelines():
    single = load("tood_R_50_1x.py").dataloader
    multi = load("tood_R_50_2x_ms.py").dataloader
    for dataloader in (single, multi):
        assert dataloader.train.mapper.image_format == "RGB"
        assert dataloader.test.mapper.image_format == "RGB"
        flip = instantiate(dataloader.train.mapper.augmentations[1])
        assert (flip.prob, flip.horizontal) == (0.5, True)
        # Test: fit into 1333 x 800 keeping the ratio, whichever side binds.
        assert _resized_shapes(dataloader.test.mapper.augmentations, 480, 640) == {(800, 1067)}
        assert _resized_shapes(dataloader.test.mapper.augmentations, 400, 1200) == {(444, 1333)}
    assert _resized_shapes(single.train.mapper.augmentations, 480, 640, n=20) == {(800, 1067)}
    np.random.seed(0)
    shorter = {s[0] for s in _resized_shapes(multi.train.mapper.augmentations, 480, 640, n=300)}
    assert min(shorter) >= 480 and max(shorter) <= 800 and len(shorter) > 100
    assert min(shorter) < 500 and max(shorter) > 780


def test_quickstart_config():
    cfg = load("quickstart_shapes.py")
    assert cfg.dataloader.train.dataset.names == "tood_shapes_train"
    assert cfg.dataloader.test.dataset.names == "tood_shapes_val"
    assert cfg.dataloader.train.total_batch_size == 8
    assert cfg.train.init_checkpoint == "" and cfg.model.backbone.bottom_up.freeze_at == 0
    # The iteration count is the one knob: the TAL switch and the LR steps follow it.
    cfg.train.max_iter = 600
    assert cfg.model.tal_start_iter == 200
    multiplier = instantiate(cfg.lr_multiplier)
    assert multiplier(449 / 600) == pytest.approx(1.0)
    assert multiplier(450 / 600) == pytest.approx(0.1)
    assert multiplier(540 / 600) == pytest.approx(0.01)


def test_deformable_block_at_rest_is_the_plain_bottleneck():
    """Zero offsets and a saturated mask: DCNv2 reduces to the convolution (ImageNet init starts from it)."""
    torch.manual_seed(0)
    dcn = DeformBottleneckBlock(64, 128, bottleneck_channels=64, stride=2, num_groups=4, norm="BN").eval()
    plain = BottleneckBlock(64, 128, bottleneck_channels=64, stride=2, num_groups=4, norm="BN").eval()
    missing, unexpected = plain.load_state_dict(dcn.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"conv2_offset.weight", "conv2_offset.bias"}
    assert not dcn.conv2_offset.weight.any()
    with torch.no_grad():
        dcn.conv2_offset.bias[18:] = 30.0  # mask logits: sigmoid -> 1
    x = torch.randn(2, 64, 20, 24)
    torch.testing.assert_close(dcn(x), plain(x), rtol=1e-4, atol=1e-4)


def test_deformable_offsets_are_dy_dx_per_kernel_tap():
    """An offset of +1 in x on every tap samples the input one pixel to the right (torchvision's/mmcv's layout)."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv2d(4, 6, 3, padding=1, bias=True, offset_conv=False)
    x = torch.randn(1, 4, 9, 11)
    offset = torch.zeros(1, 18, 9, 11)
    offset[:, 1::2] = 1.0
    out = conv(x, offset, torch.ones(1, 9, 9, 11))
    # Tap (i, j) of output (y, x) reads input (y + i - 1, x + j), zero outside: pad one row each side, two
    # columns on the right.
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), conv.weight, conv.bias)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "groups, deform_groups, stride, dilation",
    [(1, 1, 1, 1), (4, 1, 2, 1), (1, 2, 1, 2), (8, 4, 2, 1)],
)
def test_sampling_deform_conv_equals_torchvision(groups, deform_groups, stride, dilation):
    """Values and all gradients, with offsets of a few pixels that also sample outside the input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 11, 14, generator=g, requires_grad=True)
    weight = torch.randn(16, 16 // groups, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(16, generator=g, requires_grad=True)
    ho, wo = (11 - 1) // stride + 1, (14 - 1) // stride + 1
    offset = (3 * torch.randn(2, 18 * deform_groups, ho, wo, generator=g)).requires_grad_()
    mask = torch.rand(2, 9 * deform_groups, ho, wo, generator=g, requires_grad=True)
    tensors = (x, weight, bias, offset, mask)
    geometry = dict(stride=(stride, stride), padding=(dilation, dilation), dilation=(dilation, dilation))

    expected = deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    expected_grads = torch.autograd.grad(expected.square().sum(), tensors)
    ours = deform_conv2d_by_sampling(x, offset, mask, weight, bias, **geometry)
    grads = torch.autograd.grad(ours.square().sum(), tensors)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    for name, grad, expected_grad in zip(("x", "weight", "bias", "offset", "mask"), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3 * expected_grad.abs().max(), msg=name)


def test_deformable_block_runs_under_cpu_autocast():
    block = DeformBottleneckBlock(32, 32, bottleneck_channels=16, norm="BN")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(1, 32, 8, 8))
    out.float().sum().backward()
    assert block.conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overridden", [False, True])
def test_a_user_dataset_gets_its_own_epoch_length(tmp_path, overridden):
    """The zoo's schedule counts epochs: on a dataset of N images with boxes at batch 16, one epoch is ceil(N / 16)
    iterations, and the end, the LR steps and the ATSS warm-up follow; a value given on the command line is kept."""
    folder = register_shapes_dataset("epoch_shapes", num_images=50, seed=3, image_size=64, root=tmp_path)
    cfg = load("tood_R_50_1x.py")
    cfg.dataloader.train.dataset.names = "epoch_shapes"
    change = set_epoch_length(cfg, ["train.iters_per_epoch=7330"] if overridden else [])
    if overridden:
        assert change is None
        assert (cfg.train.iters_per_epoch, cfg.train.max_iter, cfg.model.tal_start_iter) == (7330, 87960, 29320)
        return
    with open(folder / "annotations.json") as f:
        annotations = json.load(f)["annotations"]
    num_images = len({a["image_id"] for a in annotations})  # images with at least one box (filter_empty)
    assert 0 < num_images < 50
    epoch = math.ceil(num_images / 16)
    assert (cfg.train.iters_per_epoch, cfg.train.max_iter, cfg.model.tal_start_iter) == (epoch, 12 * epoch, 4 * epoch)
    assert list(cfg.lr_multiplier.milestones) == [8 * epoch, 11 * epoch]
    assert f"ceil({num_images} images / batch 16) = {epoch} iterations, not the config's 7330" in change
