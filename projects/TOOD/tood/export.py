"""Export TOOD for deployment with ``torch.export`` (ExportedProgram, ONNX, AOTInductor) and run the exported model
with TOOD's own post-processing.

The exported graph is the dense part of inference: padded image -> normalise -> backbone, FPN -> T-Head with its
probability and box alignment -> per-level aligned scores and boxes in pixels. The sparse part (score threshold,
per-level top-k, class-wise NMS, max detections) stays in Python, in :func:`postprocess`, which runs
:func:`tood.meta_arch.postprocess_detections`, the function the PyTorch model runs. That split gives the PyTorch
model's detections exactly, on every runtime: the graph holds only fixed-shape dense ops whose outputs match
PyTorch to float round-off, while a threshold, a data-dependent top-k and an in-graph NMS (ONNX
``NonMaxSuppression``) would each need a second implementation of the post-processing with its own tie-breaking,
IoU rounding and class-wise semantics.

Padding happens outside the graph, in :func:`pad_image`: Detectron2's ``ImageList.from_tensors`` computes the padded
size from tensor values, which ``torch.export`` cannot keep symbolic. The graph takes an image whose height and
width are multiples of the backbone's ``size_divisibility`` (``torch.export.Dim`` times the divisibility), so that
every feature size is plain integer arithmetic on two symbols. The image is padded with the pixel mean, which is 0
after normalisation: the tensor the PyTorch model pads with zeros after normalising, value for value.

All formats come from one ``torch.export.export`` of :class:`TOODExportWrapper`:

- ``pt2``: the ExportedProgram itself (``torch.export.save``), run by PyTorch.
- ``onnx``: ``torch.onnx.export(program, dynamo=True)``, opset :data:`ONNX_OPSET` (``GridSample``, the box alignment,
  needs opset >= 16), run by ONNX Runtime.
- ``aoti``: the program compiled ahead of time by AOTInductor into a package of a shared library (needs a C++
  compiler), run by ``torch._inductor.aoti_load_package``.

Precision is fixed at export: float32, or for ``pt2`` bfloat16 autocast inside the graph (``bf16=True``), for CPUs
with bfloat16 units; it gives PyTorch's bfloat16 detections exactly. An ExportedProgram run under autocast at run
time fails on mixed dtypes in its decomposed graph, which is why the choice is made before the export and recorded
with the model. The other formats are float32 only (:data:`FLOAT32_ONLY` says why).

Input size: by default any height and width at least :func:`min_input_size` after padding (``torch.export`` takes a
dynamic size to be at least 2, which the coarsest level's size must then be); ``dynamic=False`` gives a model of
the example's padded size only.

:func:`export_and_verify` (``tools/export_model.py``) exports a LazyConfig model, then checks the exported model's
detections against the PyTorch model's on images its caller gives (:func:`verify_export`).
"""

import dataclasses
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.data.detection_utils import read_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from torch import Tensor, nn

from .meta_arch import TOOD, postprocess_detections
from .precision import choose_inference_precision, inference_autocast

__all__ = [
    "BOX_TOLERANCE_PX",
    "FORMATS",
    "ONNX_OPSET",
    "SCORE_TOLERANCE",
    "ExportResult",
    "ExportedTOOD",
    "FLOAT32_ONLY",
    "PostprocessParams",
    "TOODExportWrapper",
    "build_model",
    "choose_export_precision",
    "detection_deviations",
    "export_and_verify",
    "export_model",
    "min_input_size",
    "pad_image",
    "postprocess",
    "verification_images",
    "verify_export",
]

logger = logging.getLogger(__name__)

# The opset torch 2.15's exporter writes by default (no version conversion).
ONNX_OPSET = 20
# format -> file written into the output folder.
FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2", "aoti": "model_aoti.pt2"}
# Why a format is not exported in bfloat16.
FLOAT32_ONLY = {
    "onnx": "ONNX Runtime's CPU kernels have no bfloat16 convolution",
    "aoti": "AOTInductor's fused bfloat16 kernels round differently from PyTorch's bfloat16 autocast, by as much as "
    "bfloat16 differs from float32: its detections cannot be verified against PyTorch's",
}
# What a runtime needs besides the graph: format, input size and padding, output names, post-processing thresholds.
METADATA_FILE = "tood_export.json"
# Largest padded height or width a dynamic-size model accepts.
MAX_INPUT_SIZE = 4096
# How far the exported model's detections may be from the PyTorch model's (:func:`verify_export`).
BOX_TOLERANCE_PX = 0.01
SCORE_TOLERANCE = 1e-4


class TOODExportWrapper(nn.Module):
    """The exportable part of :class:`TOOD` inference, from one padded image to dense per-level detections.

    Input ``image``: (3, H, W) float32, pixel values 0-255 in the model's ``input_format`` (RGB for TOOD's configs),
    padded by :func:`pad_image`: H and W multiples of the backbone's ``size_divisibility``.

    Outputs (:attr:`output_names`): for each level ``l`` of ``head_in_features`` (p3..p7), ``scores_l``
    (Hl * Wl, K), the aligned probabilities; then for each level ``boxes_l`` (Hl * Wl, 4), the aligned boxes xyxy
    in pixels of the padded image (stride * aligned box). Locations are row-major over (y, x). These are the
    per-level arguments of :func:`postprocess_detections`. They are float32 in either precision: with ``bf16`` the
    network runs in bfloat16 autocast, as the PyTorch model does under it, and the aligned scores and boxes come out
    in float32 as there.
    """

    def __init__(self, model: TOOD, bf16: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bf16
        levels = model.head_in_features
        self.output_names = [f"scores_{f}" for f in levels] + [f"boxes_{f}" for f in levels]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        with inference_autocast(self.bf16):
            features = model.backbone(((image - model.pixel_mean) / model.pixel_std)[None])
            scores, boxes = model.level_predictions(model.head([features[f] for f in model.head_in_features]))
        return tuple(x[0] for x in scores + boxes)


def pad_image(image: Tensor, size_divisibility: int, pixel_mean: Sequence[float]) -> Tensor:
    """(3, H, W) image -> (3, H', W') with H', W' the next multiples of ``size_divisibility``, the new pixels set to
    ``pixel_mean``: zero after normalisation, as ``ImageList.from_tensors`` pads the normalised image."""
    div = max(size_divisibility, 1)
    h, w = image.shape[-2:]
    padded = torch.as_tensor(pixel_mean, dtype=image.dtype).view(-1, 1, 1)
    padded = padded.expand(-1, -(-h // div) * div, -(-w // div) * div).clone()
    padded[:, :h, :w] = image
    return padded


def min_input_size(model: TOOD) -> int:
    """Smallest padded height and width of a dynamic-size export: the coarsest level must have 2 cells or more."""
    div = max(model.backbone.size_divisibility, 1)
    return (max(model.head.strides) // div + 1) * div


@dataclasses.dataclass(frozen=True)
class PostprocessParams:
    """The test-time settings of :class:`TOOD`: the keyword arguments of :func:`postprocess_detections`."""

    test_score_thresh: float = 0.05
    test_topk_candidates: int = 1000
    test_nms_thresh: float = 0.6
    max_detections_per_image: int = 100

    @classmethod
    def from_model(cls, model: TOOD) -> "PostprocessParams":
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})


def postprocess(
    outputs: Sequence,
    image_size: Tuple[int, int],
    params: PostprocessParams,
    output_size: Optional[Tuple[int, int]] = None,
) -> Instances:
    """Detections from the dense outputs of an exported TOOD, as :class:`TOOD` returns them.

    Args:
        outputs: the 2L outputs of :class:`TOODExportWrapper` (tensors or numpy arrays), scores then boxes.
        image_size: (H, W) of the input image.
        params: thresholds, usually the model's (:meth:`PostprocessParams.from_model`, or the exported metadata).
        output_size: (height, width) to scale the boxes to, e.g. of the image before its test-time resize;
            default ``image_size``. As the model's ``"height"`` and ``"width"`` inputs.

    Returns:
        Instances of ``output_size`` with ``pred_boxes`` (clipped to it), ``scores``, ``pred_classes``, by
        decreasing score: ``model([{"image": image, ...}])[0]["instances"]``.
    """
    outputs = [torch.as_tensor(x) for x in outputs]
    num_levels = len(outputs) // 2
    result = postprocess_detections(
        outputs[:num_levels], outputs[num_levels:], tuple(image_size), **dataclasses.asdict(params)
    )
    return detector_postprocess(result, *(output_size or image_size))


def choose_export_precision(fmt: str, precision: Optional[str], amp: Optional[bool] = None) -> Tuple[bool, str]:
    """Whether to export ``fmt`` in bfloat16 autocast, and why, in words: as
    :func:`~tood.precision.choose_inference_precision` on CPU, except that the formats of :data:`FLOAT32_ONLY` are
    float32 unless ``precision`` asks for "bf16" (which :func:`export_model` refuses)."""
    bf16, why = choose_inference_precision(precision, amp, "cpu")
    if fmt in FLOAT32_ONLY and bf16 and precision != "bf16":
        return False, f"float32: {fmt} is exported in float32 only ({FLOAT32_ONLY[fmt]}), instead of {why}"
    return bf16, why


def export_model(
    model: TOOD, image: Tensor, output_dir: str, fmt: str, dynamic: bool = True, bf16: bool = False
) -> str:
    """Exports ``model`` (put in eval mode) with ``torch.export`` on ``image`` and writes it with its metadata into
    ``output_dir``.

    Args:
        image: (3, H, W) example input, unpadded, see :class:`TOODExportWrapper`.
        fmt: one of :data:`FORMATS`.
        dynamic: accept any padded size from :func:`min_input_size` to :data:`MAX_INPUT_SIZE` rather than the
            example's.
        bf16: compute in bfloat16 autocast (``pt2`` only, see :data:`FLOAT32_ONLY`).

    Returns:
        Path of the model file, ``output_dir/`` + ``FORMATS[fmt]``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if bf16 and fmt in FLOAT32_ONLY:
        raise ValueError(f"{fmt} is exported in float32 only: {FLOAT32_ONLY[fmt]}. Export pt2 for bfloat16.")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    wrapper = TOODExportWrapper(model, bf16).eval()
    div = max(model.backbone.size_divisibility, 1)
    example = pad_image(image, div, model.pixel_mean.flatten().tolist())
    dynamic_shapes = None
    if dynamic:
        # Sizes as multiples of the divisibility keep every level's size an integer expression of two symbols.
        sizes = {"min": min_input_size(model) // div, "max": MAX_INPUT_SIZE // div}
        dims = {1: div * torch.export.Dim("height", **sizes), 2: div * torch.export.Dim("width", **sizes)}
        dynamic_shapes = {"image": dims}
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dynamic_shapes)
        if fmt == "pt2":
            torch.export.save(program, path)
        elif fmt == "onnx":
            torch.onnx.export(
                program,
                (example,),
                path,
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=wrapper.output_names,
                external_data=False,
                verbose=False,
            )
        else:
            torch._inductor.aoti_compile_and_package(program, package_path=path)
    metadata = {
        "format": fmt,
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        "precision": "bf16" if bf16 else "fp32",
        # Padded input: None for any size from min_input_size to MAX_INPUT_SIZE.
        "input_size": None if dynamic else list(example.shape[-2:]),
        "min_input_size": min_input_size(model) if dynamic else None,
        "size_divisibility": div,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "input_format": model.input_format,
        "output_names": wrapper.output_names,
        "num_classes": model.num_classes,
        "postprocess": dataclasses.asdict(PostprocessParams.from_model(model)),
    }
    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return path


class ExportedTOOD:
    """A folder written by :func:`export_model`, run by PyTorch, ONNX Runtime or AOTInductor, then
    :func:`postprocess`.

    It computes in the precision it was exported in (:attr:`bf16`; a folder without that record is float32).

    Example::

        detector = ExportedTOOD("output/export", num_threads=4)
        instances = detector(image)  # (3, H, W) float RGB 0-255 -> Instances, as the PyTorch model
    """

    def __init__(
        self, output_dir: str, num_threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",)
    ):
        """
        Args:
            num_threads: ONNX Runtime's intra-op threads (one inter-op thread); default ONNX Runtime's choice.
                The ``pt2`` and ``aoti`` formats run on ``torch.get_num_threads()`` threads.
            providers: ONNX Runtime execution providers.
        """
        with open(os.path.join(output_dir, METADATA_FILE)) as f:
            self.metadata = json.load(f)
        self.format = self.metadata["format"]
        self.bf16 = self.metadata.get("precision") == "bf16"
        self.params = PostprocessParams(**self.metadata["postprocess"])
        path = os.path.join(output_dir, FORMATS[self.format])
        if self.format == "onnx":
            import onnxruntime as ort  # needed for ONNX models only

            options = ort.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(path, options, providers=list(providers))
        elif self.format == "pt2":
            self._module = torch.export.load(path).module()
        else:
            self._module = torch._inductor.aoti_load_package(path)

    def pad(self, image: Tensor) -> Tensor:
        """(3, H, W) image -> the padded input of the graph (:func:`pad_image`); ValueError if the model does not
        take its size."""
        meta = self.metadata
        padded = pad_image(image, meta["size_divisibility"], meta["pixel_mean"])
        size, smallest = meta["input_size"], meta["min_input_size"]
        if size is not None and list(padded.shape[-2:]) != size:
            raise ValueError(
                f"This model was exported for inputs padded to {size[0]}x{size[1]} only, got {tuple(image.shape)}"
            )
        if smallest is not None and min(padded.shape[-2:]) < smallest:
            raise ValueError(f"This model takes inputs of {smallest} px or more per side, got {tuple(image.shape)}")
        return padded

    def run(self, image: Tensor) -> List[Tensor]:
        """(3, H, W) image -> the 2L dense outputs of :class:`TOODExportWrapper` on the padded image."""
        padded = self.pad(image)
        if self.format == "onnx":
            outputs = self._session.run(None, {"image": np.ascontiguousarray(padded.numpy(), dtype=np.float32)})
            return [torch.from_numpy(x) for x in outputs]
        with torch.no_grad():
            return list(self._module(padded))

    def __call__(self, image: Tensor, output_size: Optional[Tuple[int, int]] = None) -> Instances:
        """(3, H, W) image -> Instances, see :func:`postprocess`."""
        return postprocess(self.run(image), tuple(image.shape[-2:]), self.params, output_size)


def detection_deviations(reference: Instances, other: Instances) -> Dict[str, float]:
    """How far two detection sets of one image are apart.

    Each reference detection is paired with the detection of ``other`` of the same class whose box is nearest
    (detections of near-equal scores may come in either order).

    Returns:
        ``count``: number of reference detections; ``box``: largest coordinate difference of a pair, in pixels;
        ``score``: largest score difference of a pair. ``box`` and ``score`` are inf when the counts differ or the
        pairing is not one-to-one (some detection has no partner of its class).
    """
    boxes_a, boxes_b = reference.pred_boxes.tensor, other.pred_boxes.tensor
    count = len(reference)
    if count != len(other):
        return {"count": count, "box": float("inf"), "score": float("inf")}
    if count == 0:
        return {"count": 0, "box": 0.0, "score": 0.0}
    distance = (boxes_a[:, None] - boxes_b[None]).abs().amax(dim=2)
    distance[reference.pred_classes[:, None] != other.pred_classes[None]] = float("inf")
    box_dev, match = distance.min(dim=1)
    if match.unique().numel() != count:
        return {"count": count, "box": float("inf"), "score": float("inf")}
    score_dev = (reference.scores - other.scores[match]).abs()
    return {"count": count, "box": float(box_dev.max()), "score": float(score_dev.max())}


def build_model(cfg, weights: Optional[str] = None) -> TOOD:
    """``cfg.model`` in eval mode with ``weights`` (DetectionCheckpointer); random weights without them."""
    # The ATSS warm-up length follows the training schedule; inference does not use it.
    cfg.model.tal_start_iter = 0
    model = instantiate(cfg.model).eval()
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        logger.warning(
            "No weights: exporting a randomly initialised model. Its scores sit near the classifier prior, "
            "so expect no detections; the dense outputs are still compared."
        )
    return model


def verification_images(cfg, input_format: str, paths: Sequence[str]) -> List[Tuple[str, Tensor]]:
    """(path, (3, H, W) float32 image in ``input_format``) of each of ``paths``, resized by the config's test-time
    augmentations."""
    augmentations = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
    images = []
    for path in paths:
        aug_input = T.AugInput(read_image(path, format=input_format))
        augmentations(aug_input)
        images.append((path, torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))))
    return images


def verify_export(model: TOOD, exported: ExportedTOOD, images: Sequence[Tuple[str, Tensor]]) -> bool:
    """Whether the exported model's detections equal the PyTorch model's, in the exported model's precision, on each
    of ``images`` ((path, (3, H, W)), sizes the exported model does not take skipped): same count and classes, boxes
    within :data:`BOX_TOLERANCE_PX`, scores within :data:`SCORE_TOLERANCE`. Logs the deviations of each image, and of
    the dense outputs."""
    wrapper = TOODExportWrapper(model, exported.bf16)
    ok = True
    for path, image in images:
        try:
            padded = exported.pad(image)
        except ValueError as e:
            logger.info(f"{path}: skipped, {e}")
            continue
        with torch.no_grad(), inference_autocast(exported.bf16):
            reference = model([{"image": image}])[0]["instances"]
        with torch.no_grad():
            dense_reference = wrapper(padded)
        dense = exported.run(image)
        num_levels = len(dense) // 2
        dense_dev = [float((a - b).abs().max()) for a, b in zip(dense, dense_reference)]
        dev = detection_deviations(reference, postprocess(dense, tuple(image.shape[-2:]), exported.params))
        same_classes = dev["box"] != float("inf")
        passed = dev["box"] <= BOX_TOLERANCE_PX and dev["score"] <= SCORE_TOLERANCE
        ok &= passed
        logger.info(
            f"{os.path.basename(path)} {image.shape[1]}x{image.shape[2]}: {dev['count']} detections (PyTorch), "
            f"{'same count and classes' if same_classes else 'DIFFERENT count or classes'}, "
            f"max |d box| {dev['box']:.2e} px, max |d score| {dev['score']:.2e}; dense outputs: max |d score| "
            f"{max(dense_dev[:num_levels]):.2e}, max |d box| {max(dense_dev[num_levels:]):.2e} px "
            f"-> {'OK' if passed else 'FAILED'}"
        )
    return ok


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_and_verify` made and found."""

    path: str  # the exported model's file
    export_seconds: float  # wall time of export_model
    ok: bool  # whether the exported model's detections equal the PyTorch model's on every image
    model: TOOD  # the PyTorch model, in eval mode
    exported: "ExportedTOOD"  # computes in bfloat16 where exported.bf16, as the PyTorch model must to compare
    images: List[Tuple[str, Tensor]]  # the verification images, (path, (3, H, W) input), the first one exported on


def export_and_verify(
    cfg,
    fmt: str,
    output_dir: str,
    image_paths: Sequence[str],
    weights: Optional[str] = None,
    dynamic: bool = True,
    num_threads: Optional[int] = None,
    precision: Optional[str] = None,
) -> ExportResult:
    """Exports the model of the LazyConfig ``cfg`` (:func:`build_model`) on the first of ``image_paths`` (read and
    resized by :func:`verification_images`) and verifies it on all of them (:func:`verify_export`), the exported
    model running on ``num_threads`` CPU threads (default: torch's).

    Args:
        precision: "auto", "fp32" or "bf16"; None: as the config trains (:func:`choose_export_precision`). Said in
            the log.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    bf16, why = choose_export_precision(fmt, precision, cfg.train.amp.get("enabled"))
    logger.info(f"Precision: {why}")
    model = build_model(cfg, weights)
    images = verification_images(cfg, model.input_format, image_paths)

    start = time.perf_counter()
    path = export_model(model, images[0][1], output_dir, fmt, dynamic=dynamic, bf16=bf16)
    seconds = time.perf_counter() - start
    logger.info(f"Exported {fmt} to {path} in {seconds:.1f}s")

    exported = ExportedTOOD(output_dir, num_threads=torch.get_num_threads())
    ok = verify_export(model, exported, images)
    if not ok:
        logger.error(
            f"Verification FAILED: boxes must agree within {BOX_TOLERANCE_PX} px, scores within {SCORE_TOLERANCE}"
        )
    return ExportResult(path, seconds, ok, model, exported, images)
