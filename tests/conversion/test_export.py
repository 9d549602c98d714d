"""Export with torch.export (ExportedProgram, ONNX run by ONNX Runtime, AOTInductor): the exported models give the
PyTorch model's detections at sizes they were not exported at.

Test setup for random weights: their scores sit near the 0.01 prior, below the 0.05 threshold, thousands of them
within 1e-6 of each other, where the ~1e-7 float differences between runtimes reorder them (and so change what NMS
keeps). :func:`build_model` scales the classifier's weights by 4 to spread the logits, and
:func:`separating_threshold` sets the score threshold in a clear gap below the 10 to 40 highest scores, so that
every image has detections whose scores differ by far more than round-off.
"""

from typing import List

import onnx
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances

from tests.conftest import REPO_ROOT, load_tool
from tood.data import generate_dataset
from tood.export import (
    FLOAT32_ONLY,
    ONNX_OPSET,
    ExportedTOOD,
    PostprocessParams,
    TOODExportWrapper,
    choose_export_precision,
    detection_deviations,
    export_model,
    pad_image,
)
from tood.precision import inference_autocast

BOX_ATOL_PX = 0.01
SCORE_ATOL = 1e-4
# A narrow T-Head where the point is the graph (anchor-based decoding, dynamic sizes), not the R-50 head's cost.
NARROW_HEAD = ["model.head.feat_channels=64", "model.head.stacked_convs=2", "model.num_classes=6"]
# The quick-start model with one interactive conv: half the graph, for the tool's fast-tier runs.
SHALLOW_HEAD = ["model.head.stacked_convs=1"]


def build_model(config: str, *overrides: str) -> torch.nn.Module:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(REPO_ROOT / "configs" / config)), list(overrides))
    cfg.model.tal_start_iter = 0
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():
        model.head.cls_score.weight.mul_(4)  # test setup, see the module docstring
    return model


def separating_threshold(scores: List[torch.Tensor], exact: bool = False) -> float:
    """A threshold keeping the 10 to 40 highest of the dense ``scores``, in the widest gap between two of them.

    ``exact``: for a runtime that gives PyTorch's outputs bit for bit (the bfloat16 ExportedProgram), whose kept
    scores may tie (bfloat16 has 8 bits of mantissa): equal inputs keep them in the same order.
    """
    top = torch.cat([s.flatten() for s in scores]).sort(descending=True).values[:41]
    gaps = top[:-1] - top[1:]
    i = 9 + int(gaps[9:].argmax())
    # The setup's premise: the kept scores and the threshold are far apart compared with round-off.
    assert gaps[i] > 1e-5 and (exact or gaps[:i].min() > 1e-6), gaps
    return float(top[i] + top[i + 1]) / 2


def check_exported(model, exported: ExportedTOOD, image: torch.Tensor) -> int:
    """Asserts that ``exported`` gives the PyTorch model's dense outputs and detections on ``image``, the PyTorch
    model computing in the exported model's precision; returns the number of detections."""
    dense = exported.run(image)
    num_levels = len(dense) // 2
    model.test_score_thresh = separating_threshold(dense[:num_levels], exact=exported.bf16)
    exported.params = PostprocessParams.from_model(model)

    captured = []
    hook = model.head.register_forward_hook(lambda module, inputs, outputs: captured.append(outputs))
    try:
        with torch.no_grad(), inference_autocast(exported.bf16):
            reference = model([{"image": image}])[0]["instances"]
    finally:
        hook.remove()
    cls_scores, bbox_preds = captured[0]
    # Documented layout: per level (Hl * Wl, K) and (Hl * Wl, 4) pixels, locations row-major over (y, x).
    for out, expected in zip(dense[:num_levels], cls_scores):
        # bfloat16: bit for bit (see separating_threshold)
        torch.testing.assert_close(out, expected[0].flatten(1).t().float(), atol=0 if exported.bf16 else 1e-5, rtol=0)
    for out, expected, stride in zip(dense[num_levels:], bbox_preds, model.head.strides):
        torch.testing.assert_close(out, expected[0].flatten(1).t().float() * stride, atol=BOX_ATOL_PX, rtol=0)

    detections = exported(image)
    assert detections.image_size == reference.image_size == tuple(image.shape[-2:])
    assert len(detections) == len(reference) > 0
    assert torch.equal(detections.pred_classes, reference.pred_classes)
    torch.testing.assert_close(detections.pred_boxes.tensor, reference.pred_boxes.tensor, atol=BOX_ATOL_PX, rtol=0)
    torch.testing.assert_close(detections.scores, reference.scores, atol=SCORE_ATOL, rtol=0)
    return len(reference)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    generate_dataset(folder, num_images=2, seed=1, image_size=320)
    return folder / "images"


@pytest.fixture(scope="module")
def images(image_folder):
    """Two generated images cropped to 250x320 and 200x288: neither a multiple of 32 in height, so the model pads
    (to 256x320 and 224x288); both differ from the 320x320 of the tool's sample image."""
    crops = [(250, 320), (200, 288)]
    return [
        torch.as_tensor(
            read_image(str(image_folder / f"00000{i}.jpg"), format="RGB")[:h, :w].transpose(2, 0, 1).copy()
        ).float()
        for i, (h, w) in enumerate(crops)
    ]


@pytest.fixture(scope="module")
def r50_exports(images, tmp_path_factory):
    """The R-50 anchor-free config as it is, exported as a fixed-size ONNX model and as a dynamic-size
    ExportedProgram."""
    model = build_model("tood_R_50_1x.py")
    folder = tmp_path_factory.mktemp("r50")
    export_model(model, images[0], str(folder / "onnx"), "onnx", dynamic=False)
    export_model(model, images[1], str(folder / "pt2"), "pt2")
    return model, folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_r50_anchor_free_matches_pytorch(r50_exports, images, fmt):
    model, folder = r50_exports
    exported = ExportedTOOD(str(folder / fmt), num_threads=torch.get_num_threads())
    # The fixed-size ONNX model at its own size; the ExportedProgram at the other one too.
    for image in images[: 1 if fmt == "onnx" else 2]:
        check_exported(model, exported, image)


@pytest.mark.slow
def test_fixed_size_onnx_accepts_only_its_size(r50_exports, images):
    _, folder = r50_exports
    graph = onnx.load(str(folder / "onnx" / "model.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [3, 256, 320]
    exported = ExportedTOOD(str(folder / "onnx"))
    exported.run(images[0][:, :230])  # also pads to 256x320
    with pytest.raises(ValueError, match="padded to 256x320"):
        exported(images[1])


@pytest.mark.slow
def test_anchor_based_dynamic_size(images, tmp_path):
    """One exported graph, exported on a 250x320 image, serves a 200x288 image too (other level sizes, other
    priors)."""
    model = build_model("tood_R_50_anchor_based_1x.py", *NARROW_HEAD)
    assert model.head.anchor_type == "anchor_based"
    export_model(model, images[0], str(tmp_path / "onnx"), "onnx")
    export_model(model, images[0], str(tmp_path / "pt2"), "pt2")
    onnx_model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == 3 and all(isinstance(d, str) for d in dims[1:]), dims
    assert onnx_model.opset_import[0].version == ONNX_OPSET
    assert "GridSample" in {node.op_type for node in onnx_model.graph.node}  # the box alignment is in the graph
    for fmt in ("onnx", "pt2"):
        exported = ExportedTOOD(str(tmp_path / fmt))
        for image in images:
            check_exported(model, exported, image)
        # The coarsest level (stride 128) needs 2 cells: 160 px.
        with pytest.raises(ValueError, match="160 px or more"):
            exported(images[1][:, :128])


@pytest.mark.parametrize(
    "fmt,precision",
    [("onnx", "fp32"), ("pt2", "fp32"), ("pt2", "bf16"), pytest.param("aoti", "fp32", marks=pytest.mark.slow)],
)
def test_export_and_verify(image_folder, images, tmp_path, fmt, precision):
    """What tools/export_model.py runs, on the quick-start model with a shallow head: exports on a 320x320 image in
    ``precision``, verifies against PyTorch in that precision, times both. The test then compares the written model's
    detections with PyTorch's itself, at two sizes the export did not see."""
    model = build_model("quickstart_shapes.py", *SHALLOW_HEAD)
    weights = str(tmp_path / "weights.pth")
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    sample = image_folder / "000000.jpg"
    # The tool's own verification on the sample image, with a threshold that separates its scores.
    sample_image = torch.as_tensor(read_image(str(sample), format="RGB").transpose(2, 0, 1).copy()).float()
    assert sample_image.shape[-2:] == (320, 320)
    bf16 = precision == "bf16"
    with torch.no_grad():
        dense = TOODExportWrapper(model, bf16)(pad_image(sample_image, 32, model.pixel_mean.flatten().tolist()))
    threshold = separating_threshold(list(dense[: len(dense) // 2]), exact=bf16)

    tool = load_tool("export_model")
    config = str(REPO_ROOT / "configs" / "quickstart_shapes.py")
    output = tmp_path / "export"
    args = ["--config-file", config, "--format", fmt, "--precision", precision, "--output", str(output)]
    args += ["--sample-image", str(sample)]
    args += ["--weights", weights, "--runs", "2", *SHALLOW_HEAD, f"model.test_score_thresh={threshold}"]
    report = tool.main(tool.argument_parser().parse_args(args))
    assert report["ok"] and report["bf16"] == bf16
    assert report["path"] == str(output / {"onnx": "model.onnx", "pt2": "model.pt2", "aoti": "model_aoti.pt2"}[fmt])
    assert set(report["latency_ms"]) == {"pytorch", fmt} and min(report["latency_ms"].values()) > 0
    assert report["export_s"] > 0

    exported = ExportedTOOD(str(output))
    assert exported.bf16 == bf16
    for image in images:
        check_exported(model, exported, image)
    if bf16:
        # bfloat16 inside the graph: its outputs are bfloat16's rounding (8 bits of mantissa) away from float32's.
        with torch.no_grad():
            dense32 = TOODExportWrapper(model)(exported.pad(images[0]))
        largest = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(exported.run(images[0]), dense32))
        assert largest > 1e-3, largest


def test_float32_only_formats(cpu_units, tmp_path):
    """onnx and aoti refuse bfloat16 when asked for it, and export in float32 when the choice is the CPU's or the
    config's, saying why."""
    cpu_units(True, False)
    assert choose_export_precision("pt2", "auto") == (
        True,
        "bfloat16 autocast: this CPU has AVX512-BF16 (--precision fp32 for float32)",
    )
    for fmt in FLOAT32_ONLY:
        for precision, amp in (("auto", None), (None, True)):
            bf16, why = choose_export_precision(fmt, precision, amp)
            assert not bf16 and why.startswith(f"float32: {fmt} is exported in float32 only ({FLOAT32_ONLY[fmt]})")
        assert choose_export_precision(fmt, "bf16") == (True, "bfloat16 autocast: --precision bf16")
        with pytest.raises(ValueError, match=f"{fmt} is exported in float32 only.*Export pt2 for bfloat16"):
            export_model(
                build_model("quickstart_shapes.py", *SHALLOW_HEAD),
                torch.zeros(3, 64, 64),
                str(tmp_path),
                fmt,
                bf16=True,
            )


def test_detection_deviations_pairs_by_class_and_box():
    def instances(boxes, scores, classes):
        result = Instances((100, 100))
        result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        result.scores = torch.tensor(scores)
        result.pred_classes = torch.tensor(classes)
        return result

    reference = instances([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 2])
    # Same detections in the other order, slightly moved.
    swapped = instances([[20, 20, 40, 40.005], [0, 0, 10, 10]], [0.80002, 0.9], [2, 1])
    dev = detection_deviations(reference, swapped)
    assert dev["count"] == 2 and dev["box"] == pytest.approx(0.005, abs=1e-5)
    assert dev["score"] == pytest.approx(2e-5, abs=1e-7)
    assert detection_deviations(reference, instances([[0, 0, 10, 10]], [0.9], [1]))["box"] == float("inf")
    relabelled = instances([[0, 0, 10, 10], [20, 20, 40, 40]], [0.9, 0.8], [1, 3])
    assert detection_deviations(reference, relabelled)["score"] == float("inf")
