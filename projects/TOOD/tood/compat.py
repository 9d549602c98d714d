"""Detectron2 v0.6 as its main branch: each name here is Detectron2's own object where the installed Detectron2 has
the fix, and a stand-in where it does not, so that the rest of TOOD is written against main. Main still reports
``__version__ == "0.6"``: each fix is recognised by what it changed, never by the version.

``launch``
    v0.6's ``launch`` asserts CUDA in each worker of a run of several processes (NCCL only). Main's runs them over
    gloo without CUDA since commit b4b6cc9 (PR #4720, January 2023). Recognised by
    ``comm.create_local_process_group``, added twelve days later (commit 650c60e, PR #4742): no release has one
    without the other. Main: Detectron2's ``launch``. v0.6: Detectron2's with CUDA or a single process; otherwise
    gloo workers of this module, which also share the machine's cores out among themselves and tear their process
    group down before they exit (main's workers do neither).

``MapDataset``
    v0.6's draws the replacement for an item its function skips (returns None for) with ``random.sample`` on a set,
    which Python 3.11 refuses. Main samples from a list since commit 400a49c (April 2025; no PR, the commit names
    only an internal diff). Recognised by skipping the first item of a two-item ``MapDataset``. Main: Detectron2's
    ``MapDataset``. v0.6: one that draws the replacement from the items not known to be skipped, and raises once
    every item is.

``RETINANET_HEAD_GN``
    The ``norm`` that gives ``RetinaNetHead`` and its subclass ``FCOSHead`` Detectron2's GroupNorm (32 groups).
    Before building its layers, v0.6's head builds its norm with one channel to see its type, and ``"GN"`` then
    means ``GroupNorm(32, 1)``, which current torch refuses. Main builds that one with 32 channels since commit
    330dd32 (PR #4470, August 2022). Recognised by the channels the head's first norm asks for. Main: ``"GN"``.
    v0.6: a function, ``GroupNorm(32, c)``, and ``c`` groups for the one-channel probe.

``common_optim``
    Detectron2's ``common/optim.py`` LazyConfig. v0.6's has ``SGD`` only; main's also ``AdamW`` since commit 333efcb
    (the ViTDet configs, June 2022; no PR). Recognised by that name. Main: the file as it is. v0.6: the file with an
    ``AdamW`` that builds main's optimizer: lr 1e-4, weight decay 0.1, none on norms (main also writes the lr into
    ``params.base_lr`` and torch's default betas out, which changes no value).

``has_compiled_ops``
    Not a fault of v0.6, so no upstream fix: this project installs v0.6's Python tree without its C++/CUDA sources
    and a placeholder for ``detectron2._C`` (tools/env/detectron2_c_placeholder.py). False only with that
    placeholder; a Detectron2 built from source, main's included, has its compiled ops.
"""

import gc
import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import LazyCall as L
from detectron2.data import common as d2_data
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch import retinanet
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils import comm
from torch import nn
from torch.utils.data import Dataset

__all__ = ["MapDataset", "RETINANET_HEAD_GN", "common_optim", "has_compiled_ops", "launch"]


# --- launch ---------------------------------------------------------------------------------------------------------


def _cpu_worker(local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    except dist.DistError as e:  # the store's host waited for the others in vain, or no host answered
        raise RuntimeError(
            f"Process {rank} of {world_size} did not meet the others at --dist-url {dist_url} within --dist-timeout "
            f"({timeout.total_seconds():g} s): {e} Start every machine with the same --dist-url (an address of machine "
            "0 that the others reach) and --num-machines, within --dist-timeout of each other."
        ) from e
    for i in range(world_size // num_gpus_per_machine):
        ranks = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        group = dist.new_group(ranks, timeout=timeout)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    # Processes sharing a machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus_per_machine))
    comm.synchronize()
    main_func(*args)
    # Tear the process groups down once every process is done with its collectives, while the interpreter is whole: a
    # gloo group still referenced at interpreter exit (detectron2 keeps the local one, and caches its gloo group) is
    # destroyed during finalisation, where its threads' clean-up can abort the process with SIGABRT.
    comm.synchronize()
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    dist.destroy_process_group()
    gc.collect()


def _launch_without_cuda(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Detectron2's ``launch``; without CUDA, the same processes communicating over gloo.

    A worker that raises or dies ends the run (the others are stopped, and the error names the worker); ``timeout``
    bounds how long a collective waits for a worker that neither answers nor dies (e.g. stuck, or on a lost machine),
    and how long the processes wait for each other at ``dist_url`` to start: a machine that never joins ends the
    others with an error naming the URL.
    """
    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size == 1:
        d2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout)
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _pick_launch():
    return d2_launch if hasattr(comm, "create_local_process_group") else _launch_without_cuda


launch = _pick_launch()


# --- MapDataset -----------------------------------------------------------------------------------------------------


class _MapDataset(Dataset):
    """Detectron2's ``MapDataset`` of a map-style dataset: ``map_func(dataset[i])``, and where that is None, the
    mapping of another random item not known to be skipped."""

    def __init__(self, dataset, map_func):
        self._dataset = dataset
        self._map_func = map_func
        self._rng = random.Random(42)
        self._skipped = set()

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, idx):
        index = int(idx)
        while True:
            data = self._map_func(self._dataset[index])
            if data is not None:
                return data
            self._skipped.add(index)
            if len(self._skipped) == len(self):
                raise RuntimeError(f"The mapper skipped every one of the {len(self)} images")
            while index in self._skipped:
                index = self._rng.randrange(len(self))


def _pick_map_dataset():
    try:
        d2_data.MapDataset([None, 0], lambda x: x)[0]
    except TypeError:  # random.sample refused the set of candidates
        return _MapDataset
    return d2_data.MapDataset


MapDataset = _pick_map_dataset()


# --- RETINANET_HEAD_GN ----------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    """``get_norm("GN", channels)``, with one group per channel below 32 channels (the head's probe); a function of
    the module, not a lambda, so that configs using it can be saved."""
    return nn.GroupNorm(min(32, channels), channels)


class _NormCalled(Exception):
    pass


def _raise_norm_called(channels):
    raise _NormCalled(channels)


def _pick_retinanet_head_gn():
    # The head's first call of its norm, the probe, comes before it builds any layer.
    try:
        retinanet.RetinaNetHead(
            input_shape=[ShapeSpec(channels=32)], num_classes=1, num_anchors=1, conv_dims=[32], norm=_raise_norm_called
        )
    except _NormCalled as call:
        if call.args[0] < 32:
            return _group_norm
    return "GN"


RETINANET_HEAD_GN = _pick_retinanet_head_gn()


# --- common_optim ---------------------------------------------------------------------------------------------------


def common_optim():
    """Detectron2's ``common/optim.py`` LazyConfig, with main's ``AdamW`` where it lacks one."""
    from detectron2 import model_zoo  # imports pkg_resources, which warns: only configs need it

    optim = model_zoo.get_config("common/optim.py")
    if "AdamW" not in optim:
        optim.AdamW = L(torch.optim.AdamW)(
            params=L(get_default_optimizer_params)(weight_decay_norm=0.0), lr=1e-4, weight_decay=0.1
        )
    return optim


# --- has_compiled_ops -----------------------------------------------------------------------------------------------


def has_compiled_ops() -> bool:
    """False when ``detectron2._C`` is TOOD's placeholder for the ops of a pure-Python Detectron2 install."""
    from detectron2 import _C

    return not getattr(_C, "IS_TOOD_PLACEHOLDER", False)
