"""COCO 2017 detection data as the reference trains and tests TOOD (mmdetection's coco_detection pipeline).

RGB input; resize keeping the aspect ratio to fit 1333x800 (the model pads to a multiple of 32) with the
reference's OpenCV resize (``tood.transforms.ResizeKeepRatioCV2``: mmdetection's input pixels bit for bit, where
Detectron2's ``ResizeShortestEdge`` rounds some values one level apart); horizontal flip with probability 0.5 in
training. ``dataloader_multiscale`` is the 2x schedules' training pipeline: shorter side drawn uniformly in
[480, 800], longer side at most 1333.

Training data goes through TOOD's checks (tood/data/checks.py): malformed annotations are errors naming the file
and annotation; boxes of zero size or outside their image are dropped, partly outside clipped; images without
boxes are dropped (``filter_empty``, the reference's ``filter_empty_gt``; False keeps them as negatives); an
unreadable image is skipped with a warning in training (``mapper.on_bad_image="raise"`` stops instead) and stops
evaluation. A resumed run continues the training sample stream (``start_iter``, set by tools/train_net.py).
"""

import copy

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

from tood.data.checks import CheckedDatasetMapper, get_checked_dataset_dicts
from tood.data.loader import build_train_loader
from tood.transforms import ResizeKeepRatioCV2

dataloader = OmegaConf.create()

dataloader.train = L(build_train_loader)(
    dataset=L(get_checked_dataset_dicts)(names="coco_2017_train", filter_empty=True),
    mapper=L(CheckedDatasetMapper)(
        is_train=True,
        on_bad_image="skip",
        augmentations=[
            L(ResizeKeepRatioCV2)(short_edge_length=800, max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True, prob=0.5),
        ],
        image_format="RGB",
        use_instance_mask=False,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(CheckedDatasetMapper)(
        is_train=False,
        augmentations=[L(ResizeKeepRatioCV2)(short_edge_length=800, max_size=1333)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

# tools/train_net.py turns use_fast_impl off where detectron2's compiled ops are missing.
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)

dataloader_multiscale = copy.deepcopy(dataloader)
dataloader_multiscale.train.mapper.augmentations[0] = L(ResizeKeepRatioCV2)(
    short_edge_length=(480, 800), max_size=1333, sample_style="range"
)
