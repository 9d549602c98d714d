"""COCO 2017 detection data as the reference trains and tests TOOD (mmdetection's coco_detection pipeline).

RGB input; resize keeping the aspect ratio to fit 1333x800 (the model pads to a multiple of 32); horizontal
flip with probability 0.5 in training. ``dataloader_multiscale`` is the 2x schedules' training pipeline:
shorter side drawn uniformly in [480, 800], longer side at most 1333.
"""

import copy

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from omegaconf import OmegaConf

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice"),
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
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
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
dataloader_multiscale.train.mapper.augmentations[0] = L(T.ResizeShortestEdge)(
    short_edge_length=(480, 800), max_size=1333, sample_style="range"
)
