"""Prediction on single images with a LazyConfig model: Detectron2's ``DefaultPredictor`` for LazyConfig files."""

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T

from ..checkpoint import load_trained_model
from ..precision import choose_inference_precision, inference_autocast

__all__ = ["LazyPredictor", "dataset_metadata"]


def dataset_metadata(names):
    """Metadata of the (first) dataset of ``names``, with ``thing_classes``."""
    name = names if isinstance(names, str) else names[0]
    metadata = MetadataCatalog.get(name)
    if metadata.get("thing_classes") is None:
        DatasetCatalog.get(name)  # a COCO json dataset sets its class names when it is loaded
    return metadata


class LazyPredictor:
    """The model of a LazyConfig with the weights of ``train.init_checkpoint``, on one BGR image (as cv2 reads it).

    As Detectron2's ``DefaultPredictor`` (which takes a YAML config): the image is converted to the model's input
    format and resized by the test loader's augmentations; predictions come back in the given image's coordinates.

    Args:
        precision: "auto" (bfloat16 autocast on a CPU with bfloat16 units, float32 elsewhere), "fp32" or "bf16";
            None: on CPU the precision ``train.amp.enabled`` gives training, float32 on CUDA
            (:func:`~tood.precision.choose_inference_precision`). :attr:`precision` says which, and why.
    """

    def __init__(self, cfg, precision=None):
        if not cfg.train.init_checkpoint:
            raise ValueError("No weights: set train.init_checkpoint=/path/to/model.pth")
        self.model = instantiate(cfg.model).to(cfg.train.device).eval()
        load_trained_model(self.model, cfg.train.init_checkpoint)
        self.augmentations = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
        self.input_format = cfg.dataloader.test.mapper.image_format
        self.metadata = dataset_metadata(cfg.dataloader.test.dataset.names)
        self.device = cfg.train.device
        self.bf16, self.precision = choose_inference_precision(precision, cfg.train.amp.get("enabled"), self.device)

    @torch.no_grad()
    def __call__(self, image_bgr):
        """(H, W, 3) uint8 BGR -> Instances."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
        inputs = {"image": tensor, "height": image.shape[0], "width": image.shape[1]}
        with inference_autocast(self.bf16, self.device):
            return self.model([inputs])[0]["instances"].to("cpu")
