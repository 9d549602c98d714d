"""The TOOD meta-architecture: backbone + FPN + T-Head, Task Alignment Learning, dense decoding."""

import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import Backbone, build_backbone
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from .head import TOODHead
from .losses import TOODLoss

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class TOOD(DenseDetector):
    """Task-aligned One-stage Object Detection (Feng et al., ICCV 2021).

    Training assigns with ATSS for the first ``tal_start_iter`` iterations (the warm-up) and with the
    task-aligned assigner afterwards; the phase follows the trainer's iteration (the event storage), so a
    resumed run continues in the phase it was in.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        criterion: nn.Module,
        head_in_features: Optional[List[str]] = None,
        num_classes: int,
        tal_start_iter: Optional[int] = None,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
    ):
        """
        Args:
            backbone: a backbone whose features ``head_in_features`` have the strides of ``head.strides``.
            head: :class:`tood.head.TOODHead`.
            criterion: :class:`tood.losses.TOODLoss`, the assigners and losses of Task Alignment Learning.
            num_classes: number of foreground classes.
            tal_start_iter: first iteration trained with the task-aligned assigner (earlier ones use ATSS). Only
                training needs it: None builds a model for inference, whose training raises an error.
            test_score_thresh: keep (location, class) pairs scoring above this (strict), per level.
            test_topk_candidates: then keep at most this many pairs per level.
            test_nms_thresh: class-wise NMS IoU threshold.
            max_detections_per_image: detections kept per image after NMS.
            pixel_mean, pixel_std: normalisation of the input image, in ``input_format`` channel order.
            input_format: "RGB" (the reference's) or "BGR".
        """
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        self.criterion = criterion
        self.num_classes = num_classes
        self.tal_start_iter = None if tal_start_iter is None else int(tal_start_iter)
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        self._logged_phase = None

    @classmethod
    def from_config(cls, cfg):
        """Arguments from a Detectron2 config extended by :func:`tood.config.add_tood_config`."""
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        feature_shapes = [backbone_shape[f] for f in cfg.MODEL.TOOD.IN_FEATURES]
        return {
            "backbone": backbone,
            "head": TOODHead(cfg, feature_shapes),
            "criterion": TOODLoss(cfg),
            "head_in_features": cfg.MODEL.TOOD.IN_FEATURES,
            "num_classes": cfg.MODEL.TOOD.NUM_CLASSES,
            "tal_start_iter": cfg.MODEL.TOOD.TAL_START_ITER,
            "test_score_thresh": cfg.MODEL.TOOD.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.TOOD.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.TOOD.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def level_predictions(self, predictions) -> Tuple[List[Tensor], List[Tensor]]:
        """The head's ``(cls_scores, bbox_preds)`` per location: per level ``(N, Hi * Wi, K)`` probabilities and
        ``(N, Hi * Wi, 4)`` xyxy boxes in input pixels, locations row-major as the priors."""
        cls_scores, bbox_preds = predictions
        scores = [permute_to_N_HWA_K(x, self.num_classes) for x in cls_scores]
        boxes = [permute_to_N_HWA_K(x, 4) * s for x, s in zip(bbox_preds, self.head.strides)]
        return scores, boxes

    def _use_task_alignment(self) -> bool:
        if self.tal_start_iter is None:
            raise ValueError(
                "TOOD was built without tal_start_iter, the first iteration trained with task-aligned assignment "
                "(ATSS before it); training needs it. Set MODEL.TOOD.TAL_START_ITER (YAML config) or "
                "model.tal_start_iter (LazyConfig): the reference uses 4 of 12 epochs, e.g. 29320 of the 87960 "
                "iterations of configs/COCO-Detection/tood_R_50_FPN_1x.yaml."
            )
        it = get_event_storage().iter
        tal = it >= self.tal_start_iter
        if self._logged_phase != tal:
            if tal:
                logger.info(f"Iteration {it}: task-aligned assignment (TAL) from iteration {self.tal_start_iter} on.")
            else:
                logger.info(f"Iteration {it}: ATSS warm-up until iteration {self.tal_start_iter}.")
            self._logged_phase = tal
        return tal

    def forward_training(self, images: ImageList, features, predictions, gt_instances: List[Instances]):
        scores, boxes = (torch.cat(x, dim=1) for x in self.level_predictions(predictions))
        sizes = [tuple(x.shape[-2:]) for x in predictions[0]]
        # Priors in the predictions' dtype: float32, or float64 in a float64 model.
        device, dtype = scores.device, scores.dtype
        points = self.head.prior_points(sizes, device, dtype)
        num_per_level = [len(p) for p in points]
        strides = torch.cat(
            [torch.full((n,), float(s), device=device, dtype=dtype) for n, s in zip(num_per_level, self.head.strides)]
        )
        return self.criterion(
            scores,
            boxes,
            torch.cat(self.head.prior_boxes(sizes, device, dtype)),
            torch.cat(points),
            num_per_level,
            strides,
            [x.gt_boxes.tensor for x in gt_instances],
            [x.gt_classes for x in gt_instances],
            warmup=not self._use_task_alignment(),
            valid_mask=self._valid_anchors(images.image_sizes, sizes, device),
        )

    def _valid_anchors(self, image_sizes, sizes, device) -> Optional[Tensor]:
        """(N, A) bool: anchors inside their own image padded to the size divisibility, or None if all are.

        As the reference's valid flags: anchors that only see the padding added for a larger image of the batch
        take no part in the assignment or the losses.
        """
        div = max(self.backbone.size_divisibility, 1)
        padded = [(math.ceil(h / div) * div, math.ceil(w / div) * div) for h, w in image_sizes]
        masks = []
        for ph, pw in padded:
            per_level = []
            for (fh, fw), s in zip(sizes, self.head.strides):
                rows = torch.arange(fh, device=device) < math.ceil(ph / s)
                cols = torch.arange(fw, device=device) < math.ceil(pw / s)
                per_level.append((rows[:, None] & cols[None, :]).reshape(-1))
            masks.append(torch.cat(per_level))
        mask = torch.stack(masks)
        return None if mask.all() else mask

    def forward_inference(self, images: ImageList, features, predictions) -> List[Instances]:
        scores, boxes = self.level_predictions(predictions)
        return [
            self.inference_single_image([x[i] for x in scores], [x[i] for x in boxes], image_size)
            for i, image_size in enumerate(images.image_sizes)
        ]

    def inference_single_image(
        self, scores: List[Tensor], boxes: List[Tensor], image_size: Tuple[int, int]
    ) -> Instances:
        """:func:`postprocess_detections` with this model's test-time settings."""
        return postprocess_detections(
            scores,
            boxes,
            image_size,
            test_score_thresh=self.test_score_thresh,
            test_topk_candidates=self.test_topk_candidates,
            test_nms_thresh=self.test_nms_thresh,
            max_detections_per_image=self.max_detections_per_image,
        )


def postprocess_detections(
    scores: List[Tensor],
    boxes: List[Tensor],
    image_size: Tuple[int, int],
    *,
    test_score_thresh: float,
    test_topk_candidates: int,
    test_nms_thresh: float,
    max_detections_per_image: int,
) -> Instances:
    """TOOD's detections of one image from its per-level predictions (also what an exported TOOD runs, see
    :mod:`tood.export`).

    Args:
        scores: per level ``(Hi * Wi, K)`` probabilities.
        boxes: per level ``(Hi * Wi, 4)`` xyxy pixels of the padded input.
        image_size: (h, w) of the image before padding.
        test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image: as :class:`TOOD`.

    Returns:
        Instances with ``pred_boxes``, ``scores``, ``pred_classes``, sorted by decreasing score.
    """
    all_scores, all_boxes, all_classes = [], [], []
    for scores_l, boxes_l in zip(scores, boxes):
        keep = scores_l > test_score_thresh
        kept_scores = scores_l[keep]
        idxs = torch.nonzero(keep)
        num_topk = min(test_topk_candidates, idxs.size(0))
        kept_scores, order = kept_scores.sort(descending=True)
        anchor_idxs, class_idxs = idxs[order[:num_topk]].unbind(dim=1)
        all_scores.append(kept_scores[:num_topk])
        all_boxes.append(boxes_l[anchor_idxs])
        all_classes.append(class_idxs)
    scores_cat, boxes_cat, classes_cat = torch.cat(all_scores), torch.cat(all_boxes), torch.cat(all_classes)
    # Boxes of non-positive size cannot be kept (mmdetection drops them before NMS too).
    valid = (boxes_cat[:, 2] > boxes_cat[:, 0]) & (boxes_cat[:, 3] > boxes_cat[:, 1])
    scores_cat, boxes_cat, classes_cat = scores_cat[valid], boxes_cat[valid], classes_cat[valid]
    keep = batched_nms(boxes_cat, scores_cat, classes_cat, test_nms_thresh)[:max_detections_per_image]
    result = Instances(image_size)
    result.pred_boxes = Boxes(boxes_cat[keep])
    result.scores = scores_cat[keep]
    result.pred_classes = classes_cat[keep]
    return result
