"""tood.compat: in this environment (Detectron2 v0.6, Python 3.11) each stand-in does what Detectron2 main's object
does, and where Detectron2 has the fix (made to look like main here), Detectron2's own object is used instead."""

import importlib.machinery
import os
import random
import types

import detectron2
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import common as d2_data
from detectron2.engine import launch as d2_launch
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.meta_arch import retinanet
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm
from torch import nn

from tests.conftest import REPO_ROOT, load_tool
from tood import compat

# --- launch ---------------------------------------------------------------------------------------------------------


def test_launch_is_detectron2s_where_detectron2_has_the_local_process_group_helpers(monkeypatch):
    monkeypatch.delattr(comm, "create_local_process_group", raising=False)
    assert compat._pick_launch() is compat._launch_without_cuda
    monkeypatch.setattr(comm, "create_local_process_group", lambda num_processes: None, raising=False)
    assert compat._pick_launch() is d2_launch


def _gloo_worker(out_dir):
    total = torch.tensor([comm.get_rank() + 1.0])
    torch.distributed.all_reduce(total)
    result = {
        "backend": torch.distributed.get_backend(),
        "world": comm.get_world_size(),
        "local": (comm.get_local_rank(), comm.get_local_size()),
        "total": total.item(),
        "threads": torch.get_num_threads(),
    }
    torch.save(result, os.path.join(out_dir, f"rank{comm.get_rank()}.pt"))


@pytest.mark.slow
def test_two_cpu_processes_run_over_gloo_with_their_local_group_and_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    compat._launch_without_cuda(_gloo_worker, 2, dist_url="auto", args=(str(tmp_path),))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    threads = max(1, (os.cpu_count() or 1) // 2)
    for rank, result in enumerate(results):
        assert result == {"backend": "gloo", "world": 2, "local": (rank, 2), "total": 3.0, "threads": threads}


# --- MapDataset -----------------------------------------------------------------------------------------------------


def test_stand_in_map_dataset_is_used_exactly_where_detectron2s_fails_on_a_skipped_item():
    try:
        d2_data.MapDataset([None, 0], lambda x: x)[0]
    except TypeError as error:  # v0.6
        assert "must be a sequence" in str(error)
        assert compat.MapDataset is compat._MapDataset
    else:
        assert compat.MapDataset is d2_data.MapDataset


class _SetSamplingRandom(random.Random):
    """random.Random whose ``sample`` takes a set, as detectron2 main's call (a list of the set) amounts to."""

    def sample(self, population, k):
        return super().sample(sorted(population), k)


def test_map_dataset_is_detectron2s_where_it_can_replace_a_skipped_item(monkeypatch):
    monkeypatch.setattr(d2_data, "random", types.SimpleNamespace(Random=_SetSamplingRandom))
    assert compat._pick_map_dataset() is d2_data.MapDataset


def test_stand_in_map_dataset_replaces_skipped_items_by_unskipped_ones():
    calls = []

    def keep_odd(x):
        calls.append(x)
        return x if x % 2 else None

    dataset = compat._MapDataset(list(range(10)), keep_odd)
    assert len(dataset) == 10
    assert dataset[3] == 3
    requests = [i for i in range(0, 10, 2) for _ in range(5)]
    replacements = [dataset[i] for i in requests]
    assert all(r % 2 for r in replacements)
    assert len(set(replacements)) > 1
    # A skipped item is drawn as a replacement at most once: from then on it is known to be skipped.
    assert all(calls.count(x) - requests.count(x) <= 1 for x in range(0, 10, 2))


def test_stand_in_map_dataset_says_when_every_item_is_skipped():
    with pytest.raises(RuntimeError, match="skipped every one of the 3 images"):
        compat._MapDataset([0, 2, 4], lambda x: None)[1]


# --- RETINANET_HEAD_GN ----------------------------------------------------------------------------------------------


def _head(cls, norm):
    anchors = {} if cls is FCOSHead else {"num_anchors": 1}  # FCOSHead sets its one point itself
    return cls(input_shape=[ShapeSpec(channels=64)], num_classes=2, conv_dims=[64, 64], norm=norm, **anchors)


def test_stand_in_head_gn_is_used_exactly_where_detectron2s_head_refuses_gn():
    try:
        _head(retinanet.RetinaNetHead, "GN")
    except ValueError as error:  # v0.6
        assert "divisible by num_groups" in str(error)
        assert compat.RETINANET_HEAD_GN is compat._group_norm
    else:
        assert compat.RETINANET_HEAD_GN == "GN"


@pytest.mark.parametrize("cls", [retinanet.RetinaNetHead, FCOSHead])
def test_head_gn_gives_detectron2s_group_norm_of_32_groups(cls):
    head = _head(cls, compat.RETINANET_HEAD_GN)
    norms = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in norms] == [(32, 64)] * 4
    assert compat._group_norm(1).num_groups == 1


def test_head_gn_is_detectron2s_gn_where_the_head_probes_its_norm_with_32_channels(monkeypatch):
    monkeypatch.setattr(retinanet, "get_norm", lambda norm, channels: get_norm(norm, 32 if channels == 1 else channels))
    assert compat._pick_retinanet_head_gn() == "GN"
    head = _head(retinanet.RetinaNetHead, "GN")
    assert [m.num_groups for m in head.modules() if isinstance(m, nn.GroupNorm)] == [32] * 4


# --- common_optim ---------------------------------------------------------------------------------------------------


def _param_groups(optimizer_cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.GroupNorm(4, 32))
    optimizer_cfg.params.model = model
    optimizer = instantiate(optimizer_cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    return [{**g, "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]


def test_adamw_builds_detectron2_mains_optimizer_whether_detectron2s_or_the_stand_in():
    groups = _param_groups(compat.common_optim().AdamW)
    assert {(g["lr"], g["betas"], g["weight_decay"]) for g in groups} == {
        (1e-4, (0.9, 0.999), 0.1),
        (1e-4, (0.9, 0.999), 0.0),
    }
    no_decay = [g["params"] for g in groups if g["weight_decay"] == 0.0]
    assert no_decay == [["1.weight", "1.bias"]]


def test_project_adamw_is_the_same_from_detectron2_mains_optim_config(monkeypatch):
    own = LazyConfig.load(str(REPO_ROOT / "configs" / "common" / "optim.py")).AdamW
    get_config = model_zoo.get_config

    def main_like_get_config(path):
        optim = get_config(path)
        optim.AdamW = L(torch.optim.AdamW)(
            params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
            lr=1e-4,
            betas=(0.9, 0.999),
            weight_decay=0.1,
        )
        return optim

    monkeypatch.setattr(model_zoo, "get_config", main_like_get_config)
    assert "base_lr" in compat.common_optim().AdamW.params  # Detectron2's own AdamW, kept
    from_main = LazyConfig.load(str(REPO_ROOT / "configs" / "common" / "optim.py")).AdamW
    assert (own.lr, own.weight_decay, own.params.weight_decay_norm) == (1e-3, 0.05, 0.0)
    assert _param_groups(from_main) == _param_groups(own)


# --- has_compiled_ops -----------------------------------------------------------------------------------------------


def test_compiled_ops_are_missing_with_the_placeholder_only(monkeypatch):
    """True for a source build (its ``_C`` is an extension module loaded from a file), False for the project's
    placeholder (built here by the placeholder's own code), whichever of the two is installed."""
    from detectron2 import _C

    compiled = _C.__spec__.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert compat.has_compiled_ops() == compiled, _C.__spec__.origin
    placeholder = load_tool("env/detectron2_c_placeholder")
    monkeypatch.setattr(detectron2, "_C", placeholder._make_module())
    assert not compat.has_compiled_ops()
    monkeypatch.setattr(detectron2, "_C", types.ModuleType("detectron2._C"))
    assert compat.has_compiled_ops()
