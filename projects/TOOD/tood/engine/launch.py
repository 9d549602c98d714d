"""Detectron2's ``launch``, which also starts several processes without CUDA (DDP over gloo)."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch"]


def _cpu_worker(local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout):
    rank = machine_rank * num_processes_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout)
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(num_processes_per_machine)
    else:
        for i in range(world_size // num_processes_per_machine):
            ranks = list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
            group = dist.new_group(ranks, timeout=timeout)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # Processes sharing a machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)
    # Tear the process group down once every process is done with its collectives: left to interpreter exit, gloo's
    # teardown can race the other process's (a finished two-process test run once ended in SIGABRT).
    comm.synchronize()
    dist.destroy_process_group()


def launch(
    main_func,
    num_processes_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=timedelta(minutes=30),
):
    """Detectron2's ``launch``; without CUDA, the same processes communicating over gloo.

    Detectron2 0.6's ``launch`` requires CUDA (NCCL) for more than one process. A worker that raises or dies ends
    the run (the others are stopped, and the error names the worker); ``timeout`` bounds how long a collective
    waits for a worker that neither answers nor dies (e.g. stuck, or on a lost machine).
    """
    world_size = num_machines * num_processes_per_machine
    if torch.cuda.is_available() or world_size == 1:
        d2_launch(
            main_func, num_processes_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout
        )
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )
