"""TOOD from Detectron2's yacs config: ``add_tood_config``, the YAML files, ``build_model`` and ``DefaultPredictor``.

That each YAML file builds the network of its LazyConfig twin is tested in tests/configs/test_yaml_zoo.py."""

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tests.conftest import REPO_ROOT
from tood import add_tood_config

TAL_START_ITER = 29320


def yaml_cfg(name="COCO-Detection/tood_R_50_FPN_1x.yaml"):
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def lazy_model():
    cfg = LazyConfig.load(str(REPO_ROOT / "configs/tood_R_50_1x.py"))
    # The default is an interpolation of train.max_iter; the YAML config states the number.
    cfg.model.tal_start_iter = TAL_START_ITER
    return instantiate(cfg.model)


def random_inputs(with_instances: bool, size=(160, 224)):
    g = torch.Generator().manual_seed(0)
    h, w = size
    inputs = []
    for n in (3, 1):
        item = {"image": torch.randint(0, 256, (3, h, w), generator=g).float()}
        if with_instances:
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + 16 + torch.rand(n, 2, generator=g) * 48], dim=1))
            inst.gt_classes = torch.randint(0, 80, (n,), generator=g)
            item["instances"] = inst
        inputs.append(item)
    return inputs


def assert_same_instances(a: Instances, b: Instances):
    assert a.image_size == b.image_size
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.fixture(scope="module")
def yaml_and_lazy_models():
    torch.manual_seed(0)
    from_yaml = build_model(yaml_cfg())
    torch.manual_seed(1)
    return from_yaml, lazy_model()


def test_yaml_and_lazyconfig_models_compute_the_same(yaml_and_lazy_models):
    from_yaml, from_lazy = yaml_and_lazy_models
    from_yaml.load_state_dict(from_lazy.state_dict())
    # Random weights score about 0.01 everywhere: without a threshold every level gives detections to compare.
    for model in (from_yaml, from_lazy):
        model.test_score_thresh = 0.0
    with torch.no_grad():
        for model in (from_yaml, from_lazy):
            model.eval()
        outputs = [model(random_inputs(with_instances=False)) for model in (from_yaml, from_lazy)]
        for out_yaml, out_lazy in zip(*outputs):
            assert len(out_yaml["instances"]) == 100
            assert_same_instances(out_yaml["instances"], out_lazy["instances"])

        for model in (from_yaml, from_lazy):
            model.train()
        for iteration in (0, TAL_START_ITER):  # ATSS warm-up, then task alignment
            losses = []
            for model in (from_yaml, from_lazy):
                with EventStorage(iteration):
                    losses.append(model(random_inputs(with_instances=True)))
            assert set(losses[0]) == {"loss_cls", "loss_box_reg"}
            for k, v in losses[0].items():
                assert torch.isfinite(v) and v > 0
                assert torch.equal(v, losses[1][k]), k


def test_default_predictor(tmp_path):
    cfg = yaml_cfg()
    cfg.MODEL.TOOD.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.MIN_SIZE_TEST = 320
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    torch.manual_seed(1)  # the predictor's model starts from other weights: the checkpoint must replace them
    predictor = DefaultPredictor(cfg)

    # Shorter side already 320: the predictor's resize keeps the image as it is.
    image_bgr = np.random.RandomState(0).randint(0, 256, (320, 416, 3), dtype=np.uint8)
    predicted = predictor(image_bgr)["instances"]
    rgb = torch.as_tensor(np.ascontiguousarray(image_bgr[:, :, ::-1].transpose(2, 0, 1))).float()
    with torch.no_grad():
        direct = model([{"image": rgb}])[0]["instances"]
    assert len(direct) == 100
    assert_same_instances(predicted, direct)


def small_base_cfg():
    """Base-TOOD.yaml (no schedule, so no TAL_START_ITER) with a ResNet-18 and a narrow head."""
    cfg = yaml_cfg("Base-TOOD.yaml")
    cfg.merge_from_list(
        ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.FPN.OUT_CHANNELS", 64]
        + ["MODEL.TOOD.FEAT_CHANNELS", 64, "MODEL.TOOD.NUM_CONVS", 2, "MODEL.TOOD.NUM_CLASSES", 3]
        + ["MODEL.TOOD.ANCHOR_TYPE", "anchor_based", "MODEL.TOOD.TAL_TOPK", 7, "MODEL.TOOD.NMS_THRESH_TEST", 0.5]
        + ["TEST.DETECTIONS_PER_IMAGE", 20]
    )
    return cfg


def test_config_keys_reach_the_model():
    model = build_model(small_base_cfg())
    assert model.tal_start_iter is None
    assert len(model.head.inter_convs) == 2 and model.head.cls_score.weight.shape == (3, 64, 3, 3)
    assert model.head.anchor_type == "anchor_based" and model.head.strides == (8, 16, 32, 64, 128)
    assert model.criterion.num_classes == 3 and model.criterion.tal_assigner.topk == 7
    assert model.criterion.atss_assigner.topk == 9 and model.criterion.bbox_weight == 2.0
    assert model.test_nms_thresh == 0.5 and model.max_detections_per_image == 20


def test_without_tal_start_iter_inference_works_and_training_explains():
    model = build_model(small_base_cfg())
    model.test_score_thresh = 0.0  # random weights: detections everywhere, capped at TEST.DETECTIONS_PER_IMAGE
    model.eval()
    with torch.no_grad():
        outputs = model(random_inputs(with_instances=False))
    assert [(o["instances"].image_size, len(o["instances"])) for o in outputs] == [((160, 224), 20)] * 2
    model.train()
    with EventStorage(0), pytest.raises(ValueError, match=r"without tal_start_iter.*MODEL\.TOOD\.TAL_START_ITER"):
        model(random_inputs(with_instances=True))
