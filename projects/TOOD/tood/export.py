"""Export TOOD for deployment (TorchScript, ONNX) and run the exported model with TOOD's own post-processing.

The exported graph is the dense part of inference: image -> normalise, pad -> backbone, FPN -> T-Head with its
probability and box alignment -> per-level aligned scores and boxes in pixels. The sparse part (score threshold,
per-level top-k, class-wise NMS, max detections) stays in Python, in :func:`postprocess`, which runs
:func:`tood.meta_arch.postprocess_detections`, the function the PyTorch model runs. That split gives the PyTorch
model's detections exactly, on both runtimes: the graph holds only fixed-shape dense ops whose outputs match
PyTorch to float round-off, while a threshold, a data-dependent top-k and an in-graph NMS (ONNX
``NonMaxSuppression``) would each need a second implementation of the post-processing with its own tie-breaking,
IoU rounding and class-wise semantics, and a trace would freeze ``min(topk, number kept)`` to the example's value.

Both formats come from one mechanism, ``torch.jit.trace``: TorchScript is the trace, ONNX is the TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``, opset :data:`ONNX_OPSET`; ``GridSample``, the box alignment,
needs opset >= 16). The newer ``torch.export``-based ONNX exporter fails on Detectron2 0.6's ``ImageList`` padding
(data-dependent sizes) and took 4x longer where the padding was rewritten for it.

Input size: the TorchScript module and a ``dynamic=True`` ONNX model take any H, W (the trace records the shape
arithmetic of padding, feature sizes and priors); a ``dynamic=False`` ONNX model takes only the example's size.

:func:`export_and_verify` (``tools/export_model.py``) exports a LazyConfig model, then checks the exported model's
detections against the PyTorch model's (:func:`verify_export`).
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

from .data import DEFAULT_SPLITS, get_shapes_dataset
from .meta_arch import TOOD, postprocess_detections

__all__ = [
    "BOX_TOLERANCE_PX",
    "FORMATS",
    "ONNX_OPSET",
    "SCORE_TOLERANCE",
    "ExportResult",
    "ExportedTOOD",
    "PostprocessParams",
    "TOODExportWrapper",
    "build_model",
    "detection_deviations",
    "export_and_verify",
    "export_model",
    "postprocess",
    "verification_images",
    "verify_export",
]

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
# format -> file written into the output folder.
FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}
# What a runtime needs besides the graph: format, input, output names, post-processing thresholds.
METADATA_FILE = "tood_export.json"
# How far the exported model's detections may be from the PyTorch model's (:func:`verify_export`).
BOX_TOLERANCE_PX = 0.01
SCORE_TOLERANCE = 1e-4


class TOODExportWrapper(nn.Module):
    """The traceable part of :class:`TOOD` inference, from one image to dense per-level detections.

    Input ``image``: (3, H, W) float32, pixel values 0-255 in the model's ``input_format`` (RGB for TOOD's configs):
    the ``"image"`` of a Detectron2 model input. Any H, W: the graph normalises it and zero-pads it to a multiple
    of the backbone's ``size_divisibility`` with :meth:`TOOD.preprocess_image`.

    Outputs (:attr:`output_names`): for each level ``l`` of ``head_in_features`` (p3..p7), ``scores_l``
    (Hl * Wl, K), the aligned probabilities; then for each level ``boxes_l`` (Hl * Wl, 4), the aligned boxes xyxy
    in pixels of the padded image (stride * aligned box). Locations are row-major over (y, x). These are the
    per-level arguments of :func:`postprocess_detections`.
    """

    def __init__(self, model: TOOD):
        super().__init__()
        self.model = model
        levels = model.head_in_features
        self.output_names = [f"scores_{f}" for f in levels] + [f"boxes_{f}" for f in levels]

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        model = self.model
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        scores, boxes = model.level_predictions(model.head([features[f] for f in model.head_in_features]))
        return tuple(x[0] for x in scores + boxes)


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


def export_model(model: TOOD, image: Tensor, output_dir: str, fmt: str, dynamic: bool = True) -> str:
    """Traces ``model`` (put in eval mode) on ``image`` and writes it with its metadata into ``output_dir``.

    Args:
        image: (3, H, W) example input, see :class:`TOODExportWrapper`.
        fmt: "onnx" or "torchscript".
        dynamic: ONNX only: accept any H, W rather than the example's (TorchScript always does).

    Returns:
        Path of the model file, ``output_dir/`` + ``FORMATS[fmt]``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[fmt])
    wrapper = TOODExportWrapper(model).eval()
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, (image,), check_trace=False), path)
        else:
            axes = {"image": {1: "height", 2: "width"}}
            axes.update({name: {0: f"locations_{name.split('_', 1)[1]}"} for name in wrapper.output_names})
            torch.onnx.export(
                wrapper,
                (image,),
                path,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["image"],
                output_names=wrapper.output_names,
                dynamic_axes=axes if dynamic else None,
            )
    metadata = {
        "format": fmt,
        "opset": ONNX_OPSET if fmt == "onnx" else None,
        # None: any size.
        "input_size": None if fmt == "torchscript" or dynamic else list(image.shape[-2:]),
        "input_format": model.input_format,
        "output_names": wrapper.output_names,
        "num_classes": model.num_classes,
        "postprocess": dataclasses.asdict(PostprocessParams.from_model(model)),
    }
    with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return path


class ExportedTOOD:
    """A folder written by :func:`export_model`, run by ONNX Runtime or TorchScript, then :func:`postprocess`.

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
                TorchScript runs on ``torch.get_num_threads()`` threads.
            providers: ONNX Runtime execution providers.
        """
        with open(os.path.join(output_dir, METADATA_FILE)) as f:
            self.metadata = json.load(f)
        self.format = self.metadata["format"]
        self.params = PostprocessParams(**self.metadata["postprocess"])
        path = os.path.join(output_dir, FORMATS[self.format])
        if self.format == "onnx":
            import onnxruntime as ort  # needed for ONNX models only

            options = ort.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
                options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(path, options, providers=list(providers))
        else:
            self._module = torch.jit.load(path)

    def run(self, image: Tensor) -> List[Tensor]:
        """(3, H, W) image -> the 2L dense outputs of :class:`TOODExportWrapper`."""
        size = self.metadata["input_size"]
        if size is not None and list(image.shape[-2:]) != size:
            raise ValueError(f"This model was exported for {size[0]}x{size[1]} inputs only, got {tuple(image.shape)}")
        if self.format == "onnx":
            outputs = self._session.run(None, {"image": np.ascontiguousarray(image.numpy(), dtype=np.float32)})
            return [torch.from_numpy(x) for x in outputs]
        with torch.no_grad():
            return list(self._module(image))

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


def verification_images(
    cfg, input_format: str, paths: Sequence[str] = (), num_generated: int = 2
) -> List[Tuple[str, Tensor]]:
    """(path, (3, H, W) float32 image in ``input_format``) of each of ``paths``, or without them of the first
    ``num_generated`` generated shapes images (validation seed), resized by the config's test-time augmentations."""
    if not paths:
        folder = get_shapes_dataset(num_generated, seed=DEFAULT_SPLITS["tood_shapes_val"][1])
        paths = sorted(str(p) for p in (folder / "images").iterdir())[:num_generated]
    augmentations = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
    images = []
    for path in paths:
        aug_input = T.AugInput(read_image(path, format=input_format))
        augmentations(aug_input)
        images.append((path, torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))))
    return images


def verify_export(model: TOOD, exported: ExportedTOOD, images: Sequence[Tuple[str, Tensor]]) -> bool:
    """Whether the exported model's detections equal the PyTorch model's on each of ``images`` ((path, (3, H, W)),
    a fixed-size model's other sizes skipped): same count and classes, boxes within :data:`BOX_TOLERANCE_PX`,
    scores within :data:`SCORE_TOLERANCE`. Logs the deviations of each image, and of the dense outputs."""
    wrapper = TOODExportWrapper(model)
    ok = True
    for path, image in images:
        size = exported.metadata["input_size"]
        if size is not None and list(image.shape[-2:]) != size:
            logger.info(f"{path}: skipped, {tuple(image.shape[-2:])} is not the fixed input size {tuple(size)}")
            continue
        with torch.no_grad():
            reference = model([{"image": image}])[0]["instances"]
            dense_reference = wrapper(image)
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
    ok: bool  # whether the exported model's detections equal the PyTorch model's on every image
    model: TOOD  # the PyTorch model, in eval mode
    exported: "ExportedTOOD"
    images: List[Tuple[str, Tensor]]  # the verification images, (name, (3, H, W) input), the first one traced


def export_and_verify(
    cfg,
    fmt: str,
    output_dir: str,
    weights: Optional[str] = None,
    image_paths: Sequence[str] = (),
    num_generated: int = 2,
    dynamic: bool = True,
    num_threads: Optional[int] = None,
) -> ExportResult:
    """Exports the model of the LazyConfig ``cfg`` (:func:`build_model`) traced on the first of its
    :func:`verification_images` and verifies it on all of them (:func:`verify_export`), the exported model running
    on ``num_threads`` CPU threads (default: torch's).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    model = build_model(cfg, weights)
    images = verification_images(cfg, model.input_format, image_paths, num_generated)

    start = time.perf_counter()
    path = export_model(model, images[0][1], output_dir, fmt, dynamic=dynamic)
    logger.info(f"Exported {fmt} to {path} in {time.perf_counter() - start:.1f}s")

    exported = ExportedTOOD(output_dir, num_threads=torch.get_num_threads())
    ok = verify_export(model, exported, images)
    if not ok:
        logger.error(
            f"Verification FAILED: boxes must agree within {BOX_TOLERANCE_PX} px, scores within {SCORE_TOLERANCE}"
        )
    return ExportResult(path, ok, model, exported, images)
