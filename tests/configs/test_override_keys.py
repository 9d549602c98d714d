"""One check of override keys for both config systems (``tood.engine.config_checks.check_override_keys``): a yacs
config's ``KEY VALUE`` pairs and a LazyConfig's ``key=value`` get the same message, with the close matches."""

import pytest
from detectron2.config import LazyConfig, get_cfg

from tests.conftest import REPO_ROOT
from tood import add_tood_config
from tood.engine.config_checks import ConfigKeyError, check_override_keys


def yacs_cfg():
    cfg = get_cfg()
    add_tood_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "COCO-Detection" / "tood_R_50_FPN_1x.yaml"))
    return cfg


@pytest.mark.parametrize(
    "cfg, overrides, message",
    [
        (
            yacs_cfg,
            ["MODEL.TOD.NUM_CLASSES", "3"],
            "Unknown config key 'MODEL.TOD.NUM_CLASSES': MODEL has no 'TOD'. Did you mean MODEL.TOOD.NUM_CLASSES?",
        ),
        (
            lambda: LazyConfig.load(str(REPO_ROOT / "configs" / "quickstart_shapes.py")),
            ["model.hed.num_classes=3"],
            "Unknown config key 'model.hed.num_classes': model has no 'hed'. Did you mean model.head.num_classes?",
        ),
    ],
)
def test_both_config_systems_name_the_unknown_part_and_its_close_matches(cfg, overrides, message):
    with pytest.raises(ConfigKeyError) as e:
        check_override_keys(cfg(), overrides)
    assert str(e.value).startswith(message)


def test_yacs_overrides_are_pairs_of_known_keys():
    cfg = yacs_cfg()
    check_override_keys(cfg, ["SOLVER.MAX_ITER", "10", "MODEL.TOOD.NUM_CLASSES", "3"])
    with pytest.raises(ValueError, match="KEY VALUE pairs, e.g. SOLVER.MAX_ITER 1000"):
        check_override_keys(cfg, ["SOLVER.MAX_ITER=10"])
    with pytest.raises(ConfigKeyError, match="SOLVER.MAX_ITER has no 'X'"):  # below a value, nothing is known
        check_override_keys(cfg, ["SOLVER.MAX_ITER.X", "1"])
