"""T-Head: parity with mmdetection 3.3's TOODHead (oracle), its building blocks, weight mapping and init."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from torch import nn
from torchvision.ops import deform_conv2d

from tood.head import DELTA_XYWH_STDS, MAX_LOG_SIZE_RATIO, TOODHead, decode_delta_xywh
from tood.layers import ModulatedDeformConv2d, align_boxes, sigmoid_geometric_mean
from tood.mmdet_names import (
    CheckpointMismatch,
    convert_head_state_dict_to_mmdet,
    convert_mmdet_head_state_dict,
)
from tood.priors import level_boxes, level_points

pytestmark = pytest.mark.reference_threads  # compares with tensors recorded from mmdetection

STRIDES = (8, 16, 32, 64, 128)
# The device-dependent paths (grid_sample, deform_conv2d, autocast) are also checked on a GPU when there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _shapes(channels, strides=STRIDES):
    return [ShapeSpec(channels=channels, stride=s) for s in strides]


def _small_head(**kwargs):
    """A narrow two-level head (GN needs channels divisible by 32) for tests that need no reference weights."""
    args = dict(input_shape=_shapes(64, (8, 16)), num_classes=5, feat_channels=64, stacked_convs=3, strides=(8, 16))
    args.update(kwargs)
    return TOODHead(**args)


def _small_features(batch=2, channels=64, sizes=((9, 11), (5, 6))):
    return [torch.randn(batch, channels, h, w) for h, w in sizes]


def _load_oracle_head(head_oracle):
    head = TOODHead(input_shape=_shapes(256), num_classes=80)
    head.load_state_dict(convert_mmdet_head_state_dict(head_oracle["state_dict"], head), strict=True)
    return head


@pytest.fixture(scope="module")
def oracle_head(head_oracle):
    return _load_oracle_head(head_oracle)


# ---------------------------------------------------------------------------------------------------------------
# Parity with mmdetection's head
# ---------------------------------------------------------------------------------------------------------------


def test_forward_matches_mmdet(head_oracle, oracle_head):
    with torch.no_grad():
        cls_scores, bbox_preds = oracle_head(head_oracle["inputs"]["feats"])
    for name, ours, refs in (
        ("cls_scores", cls_scores, head_oracle["outputs"]["cls_scores"]),
        ("bbox_preds", bbox_preds, head_oracle["outputs"]["bbox_preds"]),
    ):
        for level, (a, ref) in enumerate(zip(ours, refs)):
            assert a.shape == ref.shape and a.dtype == torch.float32
            dev = (a - ref).abs().max().item()
            scale = ref.abs().max().item()
            print(f"{name}[{level}] max |dev| {dev:.2e}, relative to max |ref| {dev / scale:.2e}")
            assert dev <= 1e-5 * scale, f"{name}[{level}]"


class _KinkReLU(nn.Module):
    """ReLU that records inputs within ``tau`` of the kink and can flip the derivative at chosen ones.

    The reference's features differ from ours by float round-off (~1e-6); a ReLU input that close to 0 may sit on
    the other side of the kink there, which changes the gradient by a finite amount and, through GroupNorm and the
    global pooling, everywhere on that level. Flipping such a unit's derivative (its value moves by < tau) tells
    round-off apart from a wrong backward.
    """

    def __init__(self, site, tau, log):
        super().__init__()
        self.site, self.tau, self.log, self.flips, self.calls = site, tau, log, set(), 0

    def forward(self, x):
        call, self.calls = self.calls, self.calls + 1
        mask = x > 0
        for idx in (x.detach().abs() < self.tau).nonzero().tolist():
            unit = (self.site, call, tuple(idx))
            self.log.add(unit)
            if unit in self.flips:
                mask[tuple(idx)] = ~mask[tuple(idx)]
        return x * mask


def _install_kink_relus(head, tau):
    log, relus = set(), []
    sites = [(f"inter{i}", conv) for i, conv in enumerate(head.inter_convs)]
    sites += [("cls_decomp", head.cls_decomp.reduction), ("reg_decomp", head.reg_decomp.reduction)]
    for site, conv in sites:
        conv.activation = _KinkReLU(site, tau, log)
        relus.append(conv.activation)
    for site, seq in (
        ("cls_attention", head.cls_decomp.layer_attention),
        ("reg_attention", head.reg_decomp.layer_attention),
        ("alignment_map", head.alignment_map),
        ("offset_map", head.offset_map),
    ):
        seq.relu = _KinkReLU(site, tau, log)
        relus.append(seq.relu)
    return log, relus


def test_backward_matches_mmdet(head_oracle):
    """Chain rule: our backward of the reference's output gradients gives the reference's feature gradients."""
    # Levels are independent (only the weights are shared), so deviations are judged per level.
    epochs = [head_oracle["loss"][e] for e in ("epoch0", "epoch4")]
    num_levels = len(STRIDES)
    head = _load_oracle_head(head_oracle)
    log, relus = _install_kink_relus(head, tau=1e-6)

    def deviations(flips):
        for relu in relus:
            relu.flips, relu.calls = flips, 0
        feats = [f.clone().requires_grad_() for f in head_oracle["inputs"]["feats"]]
        cls_scores, bbox_preds = head(feats)
        devs = []
        for loss in epochs:
            grads = torch.autograd.grad(
                cls_scores + bbox_preds, feats, loss["grad_cls_scores"] + loss["grad_bbox_preds"], retain_graph=True
            )
            devs.append([((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, loss["grad_feats"])])
        # per level: the worse of the two epochs
        return [max(d[level] for d in devs) for level in range(num_levels)]

    plain = deviations(set())
    near_kink = sorted(log)  # (site, call, index); every site runs once per level, so call == level
    # Only levels off by more than round-off are searched; greedily, as flips barely interact.
    suspects = [unit for unit in near_kink if plain[unit[1]] > 1e-5]
    assert len(suspects) <= 4, "too many ambiguous ReLU inputs to search"
    flips, best = set(), list(plain)
    for unit in suspects:
        trial = deviations(flips | {unit})
        if trial[unit[1]] < 0.5 * best[unit[1]]:
            flips, best = flips | {unit}, trial
    for level in range(num_levels):
        print(f"grad_feats[{level}] max |dev| / max |ref|: {plain[level]:.2e} as is, {best[level]:.2e} with flips")
    print(f"ReLU inputs within 1e-6 of 0: {len(near_kink)}; flipped to match the reference: {sorted(flips)}")
    assert len(flips) <= 2
    # measured <= 8.3e-6; the reference's own fp32 backward is that far from a float64 one
    assert max(best) <= 2e-5


def test_parameter_set_equals_reference(head_oracle, oracle_head):
    ref = head_oracle["state_dict"]
    ours = dict(oracle_head.named_parameters())
    assert len(ours) == len(ref) == 49
    assert len(oracle_head.state_dict()) == 49  # no buffers: the prior cache stays out of checkpoints
    mapped = convert_head_state_dict_to_mmdet(oracle_head.state_dict(), oracle_head)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    total = sum(p.numel() for p in ours.values())
    print(f"head parameters: {total}")
    assert total == sum(v.numel() for v in ref.values())


def test_priors_match_reference_and_are_cached(head_oracle, oracle_head):
    sizes = [tuple(f.shape[-2:]) for f in head_oracle["inputs"]["feats"]]
    for ours, ref in zip(oracle_head.prior_boxes(sizes, "cpu"), head_oracle["priors"]):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    first, second = oracle_head.prior_points(sizes, "cpu"), oracle_head.prior_points(sizes, torch.device("cpu"))
    assert all(a is b for a, b in zip(first, second))
    for points, size, s in zip(first, sizes, STRIDES):
        torch.testing.assert_close(points, level_points(size, s), rtol=0, atol=0)
    assert oracle_head.prior_points(sizes, "cpu", dtype=torch.float64)[0].dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(7, 9), (1, 9), (6, 1), (1, 1)])
def test_align_boxes_equals_deform_conv2d(size, device):
    h, w = size
    boxes = torch.randn(2, 4, h, w, dtype=torch.float64, device=device) * 10
    # Offsets up to +-4 pixels: many sampling points leave the map, some entirely.
    offsets = torch.randn(2, 8, h, w, dtype=torch.float64, device=device) * 2
    offsets[0, :, 0, 0] = torch.tensor([-5.0, 0.3, 0.2, -5.0, 9.0, 9.0, -0.5, 0.5], dtype=torch.float64)
    boxes.requires_grad_()
    offsets.requires_grad_()
    ours = align_boxes(boxes, offsets)
    ref = deform_conv2d(boxes, offsets, torch.ones(4, 1, 1, 1, dtype=torch.float64, device=device))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    assert ours[0, :3, 0, 0].abs().max() == 0  # sampled entirely outside the map
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (boxes, offsets), upstream)
    ref_grads = torch.autograd.grad(ref, (boxes, offsets), upstream)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-9)
    # fp32, as the head runs it: float round-off of the normalised grid, relative to the values' scale.
    ours32 = align_boxes(boxes.detach().float(), offsets.detach().float())
    ref32 = deform_conv2d(boxes.detach().float(), offsets.detach().float(), torch.ones(4, 1, 1, 1, device=device))
    assert (ours32 - ref32).abs().max() <= 1e-5 * boxes.abs().max()


class _Align(nn.Module):
    def forward(self, boxes, offsets):
        return align_boxes(boxes, offsets)


def test_align_boxes_exports_as_standard_ops():
    boxes, offsets = torch.randn(1, 4, 5, 6), torch.randn(1, 8, 5, 6)
    program = torch.export.export(_Align(), (boxes, offsets))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("grid_sampler" in t for t in targets)
    assert all(t.startswith("aten.") for t in targets), targets
    torch.testing.assert_close(program.module()(boxes, offsets), align_boxes(boxes, offsets))


def test_align_boxes_onnx_export():
    pytest.importorskip("onnxscript")  # torch's ONNX exporter
    program = torch.onnx.export(
        _Align().eval(), (torch.randn(1, 4, 5, 6), torch.randn(1, 8, 5, 6)), dynamo=True, verbose=False
    )
    assert "GridSample" in {node.op_type for node in program.model_proto.graph.node}


def test_sigmoid_geometric_mean_gradient():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)  # broadcast over classes, as in the head
    assert torch.autograd.gradcheck(sigmoid_geometric_mean, (logits, m))
    plain = (logits.sigmoid() * m.sigmoid()).sqrt()
    ours = sigmoid_geometric_mean(logits, m)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    upstream = torch.randn_like(ours)
    for g, r in zip(
        torch.autograd.grad(ours, (logits, m), upstream), torch.autograd.grad(plain, (logits, m), upstream)
    ):
        torch.testing.assert_close(g, r)


def test_sigmoid_geometric_mean_gradient_finite_where_product_is_zero():
    # sigmoid(-200) underflows to 0 in fp32: the limit of the gradient is 0, autograd through sqrt gives nan.
    logits = torch.tensor([-200.0, -200.0, 3.0], requires_grad=True)
    m = torch.tensor([-200.0, 2.0, -200.0], requires_grad=True)
    out = sigmoid_geometric_mean(logits, m)
    assert out[0] == 0
    grads = torch.autograd.grad(out.sum(), (logits, m))
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0] == 0 and grads[1][0] == 0
    plain = (logits.sigmoid() * m.sigmoid()).sqrt()
    plain_grads = torch.autograd.grad(plain.sum(), (logits, m))
    assert not torch.isfinite(plain_grads[0][0])  # why the analytic gradient is needed


class _GeometricMean(nn.Module):
    def forward(self, logits, m):
        return sigmoid_geometric_mean(logits, m)


def test_sigmoid_geometric_mean_is_plain_when_no_gradient_is_taken():
    a, b = torch.randn(3, 4), torch.randn(3, 1)
    with torch.no_grad():
        program = torch.export.export(_GeometricMean(), (a, b))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.sqrt.default" in targets and all(t.startswith("aten.") for t in targets), targets
    torch.testing.assert_close(program.module()(a, b), (a.sigmoid() * b.sigmoid()).sqrt())
    with torch.no_grad():
        assert sigmoid_geometric_mean(a.requires_grad_(), b).grad_fn is None
    # With a gradient to take, the analytic-gradient function.
    assert type(sigmoid_geometric_mean(a, b).grad_fn).__name__ == "_SigmoidGeometricMeanBackward"


def _delta_xywh_scalar(anchor, delta):
    """Textbook delta-xywh with TOOD's stds and mmdet's two-sided clamp of the log-size deltas, one box."""
    x1, y1, x2, y2 = anchor
    dx, dy, dw, dh = (d * s for d, s in zip(delta, DELTA_XYWH_STDS))
    limit = abs(math.log(16 / 1000))
    dw, dh = min(max(dw, -limit), limit), min(max(dh, -limit), limit)
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + 0.5 * w + dx * w, y1 + 0.5 * h + dy * h
    w, h = w * math.exp(dw), h * math.exp(dh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_decode_delta_xywh_equals_scalar_implementation():
    anchors = level_boxes(level_points((3, 4), 16), 16, 8).t().reshape(4, 3, 4)
    anchors = anchors + torch.rand(4, 3, 4) * 5  # non-square too
    deltas = torch.randn(2, 4, 3, 4) * 3
    deltas[0, 2:, 0, 0] = torch.tensor([40.0, -40.0])  # beyond the clamp on both sides
    deltas[1, 2:, 0, 1] = torch.tensor([-25.0, 25.0])
    out = decode_delta_xywh(deltas, anchors)
    assert MAX_LOG_SIZE_RATIO == pytest.approx(math.log(1000 / 16))
    for n, i, j in itertools.product(range(2), range(3), range(4)):
        expected = _delta_xywh_scalar(anchors[:, i, j].double().tolist(), deltas[n, :, i, j].double().tolist())
        torch.testing.assert_close(
            out[n, :, i, j].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4
        )


def test_detectron2_box2box_transform_differs_from_mmdet_coder():
    """Why decode_delta_xywh exists: Box2BoxTransform((10, 10, 5, 5)) agrees except where dw, dh < -log(1000/16)."""
    transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0), scale_clamp=MAX_LOG_SIZE_RATIO)
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(3, 4)
    deltas = torch.tensor([[0.5, -0.3, 1.0, -2.0], [0.0, 0.0, 40.0, 40.0], [0.0, 0.0, -40.0, -40.0]])
    ours = decode_delta_xywh(deltas.t().reshape(1, 4, 3, 1), anchors.t().reshape(4, 3, 1))[0, :, :, 0].t()
    theirs = transform.apply_deltas(deltas, anchors)
    torch.testing.assert_close(ours[:2], theirs[:2])
    # dw = -40 * 0.2 = -8: mmdet clamps it to log(16 / 1000), detectron2 does not clamp from below
    assert (ours[2, 2] - ours[2, 0]).item() == pytest.approx(64 * 16 / 1000, rel=1e-5)
    assert (theirs[2, 2] - theirs[2, 0]).item() == pytest.approx(64 * math.exp(-8), rel=1e-4)


def test_anchor_based_head_decodes_scaled_deltas_on_square_priors():
    head = _small_head(anchor_type="anchor_based")
    nn.init.zeros_(head.offset_map.predict.weight)  # offsets 0: the aligned boxes are the decoded ones
    with torch.no_grad():
        head.scales[0].scale.fill_(0.5)
        head.scales[1].scale.fill_(2.0)
    raw = []
    head.bbox_pred.register_forward_hook(lambda mod, inp, out: raw.append(out))
    feats = _small_features()
    with torch.no_grad():
        _, bbox_preds = head(feats)
    for level, (boxes, stride) in enumerate(zip(bbox_preds, head.strides)):
        deltas = raw[level] * head.scales[level].scale
        priors = level_boxes(level_points(feats[level].shape[-2:], stride), stride, 8)
        n, _, h, w = boxes.shape
        for b, i, j in itertools.product(range(n), range(h), range(w)):
            expected = _delta_xywh_scalar(priors[i * w + j].tolist(), deltas[b, :, i, j].tolist())
            expected = torch.tensor(expected) / stride
            torch.testing.assert_close(boxes[b, :, i, j], expected, rtol=1e-5, atol=1e-5)


def test_dcn_layout_follows_mmcv():
    """conv_offset's channels: (dy, dx) per tap grouped by deform group, then one mask logit per tap and group."""
    groups, c_in, c_out = 2, 4, 3
    conv = ModulatedDeformConv2d(c_in, c_out, 3, padding=1, deform_groups=groups, bias=True)
    shifts = [(1.0, 0.0), (-1.0, 2.0)]  # integer (dy, dx) per group: bilinear sampling is exact
    masks = [0.8, 0.3]
    bias = torch.zeros(3 * groups * 9)
    for g, ((dy, dx), p) in enumerate(zip(shifts, masks)):
        bias[g * 18 : (g + 1) * 18 : 2] = dy
        bias[g * 18 + 1 : (g + 1) * 18 : 2] = dx
        bias[2 * groups * 9 + g * 9 : 2 * groups * 9 + (g + 1) * 9] = math.log(p / (1 - p))
    with torch.no_grad():
        conv.conv_offset.bias.copy_(bias)
        conv.bias.normal_()
    x = torch.randn(1, c_in, 6, 7)
    expected = conv.bias.view(1, -1, 1, 1).expand(1, c_out, 6, 7).clone()
    per_group = c_in // groups
    pad = 3  # > largest shift + 1: every sampled pixel outside the map reads the zero margin
    padded = F.pad(x, (pad, pad, pad, pad))
    for g, ((dy, dx), p) in enumerate(zip(shifts, masks)):
        # tap (ky, kx) at output (i, j) samples x at (i + ky - 1 + dy, j + kx - 1 + dx)
        top, left = pad - 1 + int(dy), pad - 1 + int(dx)
        window = padded[:, g * per_group : (g + 1) * per_group, top : top + 6 + 2, left : left + 7 + 2]
        expected += p * F.conv2d(window, conv.weight[:, g * per_group : (g + 1) * per_group])
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_dcn_head_runs_and_maps_mmdet_names():
    head = _small_head(num_dcn=2, dcn_deform_groups=4)
    assert isinstance(head.inter_convs[1], ModulatedDeformConv2d)
    assert not isinstance(head.inter_convs[2], ModulatedDeformConv2d)
    feats = [f.requires_grad_() for f in _small_features()]
    cls_scores, bbox_preds = head(feats)
    (sum(c.sum() for c in cls_scores) + sum(b.sum() for b in bbox_preds)).backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    assert head.inter_convs[0].conv_offset.weight.grad.abs().sum() > 0

    # The names of mmdet's head: ConvModule(conv=ModulatedDeformConv2dPack(conv_offset), gn) for the DCN convs.
    offset_shape = (3 * 4 * 9, 64, 3, 3)
    mmdet_sd = convert_head_state_dict_to_mmdet(head.state_dict(), head)
    for k in range(2):
        assert tuple(mmdet_sd[f"inter_convs.{k}.conv.conv_offset.weight"].shape) == offset_shape
        assert tuple(mmdet_sd[f"inter_convs.{k}.conv.conv_offset.bias"].shape) == offset_shape[:1]
        assert f"inter_convs.{k}.conv.weight" in mmdet_sd and f"inter_convs.{k}.gn.weight" in mmdet_sd
    assert "inter_convs.2.conv.conv_offset.weight" not in mmdet_sd
    fresh = _small_head(num_dcn=2, dcn_deform_groups=4)
    fresh.load_state_dict(convert_mmdet_head_state_dict(mmdet_sd, fresh), strict=True)
    with torch.no_grad():
        for a, b in zip(fresh(feats)[1], head(feats)[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_initialisation():
    head = TOODHead(input_shape=_shapes(256), num_classes=80, num_dcn=1)
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for bias in (head.cls_score.bias, head.alignment_map.predict.bias):
        torch.testing.assert_close(bias, torch.full_like(bias, prior_bias))
    zero_biases = [head.bbox_pred.bias, head.alignment_map.reduce.bias]
    zero_biases += [head.offset_map.reduce.bias, head.offset_map.predict.bias]
    for decomp in (head.cls_decomp, head.reg_decomp):
        zero_biases += [decomp.layer_attention.fc1.bias, decomp.layer_attention.fc2.bias]
    assert all(b.abs().max() == 0 for b in zero_biases)
    assert head.inter_convs[0].bias is None and head.cls_decomp.reduction.bias is None  # GN follows
    stds = {0.01: [conv.weight for conv in head.inter_convs], 0.001: []}
    stds[0.01] += [head.cls_score.weight, head.bbox_pred.weight]
    stds[0.01] += [head.alignment_map.reduce.weight, head.alignment_map.predict.weight]
    stds[0.001] += [head.offset_map.reduce.weight, head.offset_map.predict.weight]
    for decomp in (head.cls_decomp, head.reg_decomp):
        stds[0.01].append(decomp.reduction.weight)
        stds[0.001] += [decomp.layer_attention.fc1.weight, decomp.layer_attention.fc2.weight]
    for std, weights in stds.items():
        for w in weights:
            # 5 standard errors of the sample std and mean of n normal draws
            n = w.numel()
            assert abs(w.std().item() / std - 1) < 5 / math.sqrt(2 * n), (std, tuple(w.shape))
            assert abs(w.mean().item()) < 5 * std / math.sqrt(n), (std, tuple(w.shape))
    assert head.inter_convs[0].conv_offset.weight.abs().max() == 0  # DCN starts as a plain conv
    assert head.inter_convs[0].conv_offset.bias.abs().max() == 0
    for module in head.modules():
        if isinstance(module, nn.GroupNorm):
            assert module.num_groups == 32 and module.weight.eq(1).all() and module.bias.eq(0).all()
    assert all(s.scale.item() == 1.0 for s in head.scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_dcn", [0, 2])
def test_autocast(num_dcn, device):
    head = _small_head(num_dcn=num_dcn).to(device)
    with torch.no_grad():  # make the DCN offsets non-trivial
        for conv in head.inter_convs[:num_dcn]:
            conv.conv_offset.weight.normal_(std=0.01)
    feats = [f.to(device).requires_grad_() for f in _small_features()]
    with torch.no_grad():
        ref_cls, ref_box = head(feats)
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        cls_scores, bbox_preds = head(feats)
    for out, ref in zip(cls_scores + bbox_preds, ref_cls + ref_box):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    (sum(c.sum() for c in cls_scores) + sum(b.sum() for b in bbox_preds)).backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_from_config_reads_present_keys():
    cfg = CfgNode({"MODEL": CfgNode({"TOOD": CfgNode({"NUM_CLASSES": 3, "NUM_CONVS": 2, "FEAT_CHANNELS": 64})})})
    head = TOODHead(cfg, _shapes(64, (8, 16, 32)))
    assert head.num_classes == 3 and len(head.inter_convs) == 2 and head.strides == (8, 16, 32)
    assert head.cls_score.weight.shape == (3, 64, 3, 3) and head.anchor_type == "anchor_free"


# ---------------------------------------------------------------------------------------------------------------
# Mapping refusals
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mmdet_small_sd():
    head = _small_head()
    return head, convert_head_state_dict_to_mmdet(head.state_dict(), head)


def test_mapping_refuses_unknown_key(mmdet_small_sd):
    head, sd = mmdet_small_sd
    for extra in ("bbox_head.tood_cls.weight", "inter_convs.3.conv.weight", "inter_convs.0.conv.conv_offset.weight"):
        bad = dict(sd, **{extra: torch.zeros(1)})
        with pytest.raises(CheckpointMismatch, match="unknown keys") as err:
            convert_mmdet_head_state_dict(bad, head)
        assert err.value.unknown == [extra] and extra in str(err.value)


def test_mapping_refuses_missing_key(mmdet_small_sd):
    head, sd = mmdet_small_sd
    bad = {k: v for k, v in sd.items() if k != "tood_reg.bias"}
    with pytest.raises(CheckpointMismatch, match=r"missing keys \(1\): bbox_pred\.bias \(mmdet: tood_reg\.bias\)"):
        convert_mmdet_head_state_dict(bad, head)


def test_mapping_refuses_wrong_shape(mmdet_small_sd):
    head, sd = mmdet_small_sd
    bad = dict(sd, **{"tood_cls.weight": torch.zeros(6, 64, 3, 3)})  # 6 classes for a 5-class head
    with pytest.raises(CheckpointMismatch, match=r"wrong shapes \(1\): tood_cls\.weight \(6, 64, 3, 3\)"):
        convert_mmdet_head_state_dict(bad, head)


def test_reverse_mapping_refuses(mmdet_small_sd):
    head, _ = mmdet_small_sd
    ours = head.state_dict()
    with pytest.raises(CheckpointMismatch) as err:
        convert_head_state_dict_to_mmdet(
            dict({k: v for k, v in ours.items() if k != "scales.1.scale"}, **{"extra.weight": torch.zeros(1)}), head
        )
    assert err.value.unknown == ["extra.weight"] and err.value.missing == ["scales.1.scale"]


def test_head_without_norm_has_conv_biases_and_maps():
    head = _small_head(norm="")
    assert head.inter_convs[0].norm is None and head.inter_convs[0].bias is not None
    assert head.cls_decomp.reduction.bias is not None
    mmdet_sd = convert_head_state_dict_to_mmdet(head.state_dict(), head)
    assert "inter_convs.0.conv.bias" in mmdet_sd and "reg_decomp.reduction_conv.conv.bias" in mmdet_sd
    with torch.no_grad():
        head.cls_decomp.reduction.bias.normal_()
        cls_scores, _ = head(_small_features())
    assert all(torch.isfinite(c).all() for c in cls_scores)


def test_alignment_prior_is_configurable_and_defaults_to_the_reference():
    shapes = [ShapeSpec(channels=8)] * 2
    default = TOODHead(input_shape=shapes, num_classes=3, feat_channels=8, stacked_convs=2, strides=(8, 16), norm="")
    torch.testing.assert_close(default.alignment_map.predict.bias, default.cls_score.bias[:1])
    head = TOODHead(
        input_shape=shapes,
        num_classes=3,
        feat_channels=8,
        stacked_convs=2,
        strides=(8, 16),
        norm="",
        alignment_prior_prob=0.5,
    )
    assert torch.all(head.alignment_map.predict.bias == 0.0)  # sigmoid(0) = 0.5
    assert torch.allclose(head.cls_score.bias.sigmoid(), torch.tensor(0.01))
