"""Several processes: a failing, dying or hanging worker ends the run; normalisers are averaged over processes,
which stop together on a non-finite loss; a finished worker tears its process group down."""

import os
import time
from datetime import timedelta

import pytest
import torch
from detectron2.utils import comm

from tood.engine import launch
from tood.engine.train_loop import check_losses_finite
from tood.losses import TOODLoss, TOODTargets


def _failing_worker(kind):
    if comm.get_rank() == 1:
        if kind == "raise":
            raise RuntimeError("worker 1 failed on purpose")
        if kind == "die":
            os._exit(3)
        time.sleep(120)  # "hang": alive but never reaching the collective
    comm.synchronize()


@pytest.mark.slow
@pytest.mark.parametrize("kind, words", [("raise", "worker 1 failed on purpose"), ("die", "exit code 3"), ("hang", "")])
def test_failing_worker_ends_the_run(kind, words):
    start = time.perf_counter()
    with pytest.raises(Exception) as e:  # noqa: B017  (torch.multiprocessing's ProcessRaised/ExitedException)
        launch(_failing_worker, 2, dist_url="auto", args=(kind,), timeout=timedelta(seconds=5))
    assert time.perf_counter() - start < 60
    message = str(e.value)
    assert words in message
    if kind == "hang":  # rank 0 gave up waiting at the process group's timeout
        assert "Process 0 terminated" in message and ("timed out" in message.lower() or "timeout" in message.lower())


def test_a_finished_worker_tears_its_process_group_down():
    # One gloo process, in this one: once the main function returns, nothing of the group is left for interpreter
    # exit to tear down (there, gloo's teardown could race another process's).
    from detectron2.engine.launch import _find_free_port

    from tood.compat import _cpu_worker

    seen = []
    threads, local_group = torch.get_num_threads(), comm._LOCAL_PROCESS_GROUP
    try:
        url = f"tcp://127.0.0.1:{_find_free_port()}"
        _cpu_worker(0, lambda: seen.append(comm.get_world_size()), 1, 1, 0, url, (), timedelta(seconds=30))
    finally:
        torch.set_num_threads(threads)
        comm._LOCAL_PROCESS_GROUP = local_group
    assert seen == [1]
    assert not torch.distributed.is_initialized()


def _normalizer_worker(out_dir):
    rank = comm.get_rank()
    # Rank 0: classification targets summing to 3, box weights to 2; rank 1: 7 and 6.
    cls_sum, box_sum = (3.0, 2.0) if rank == 0 else (7.0, 6.0)
    zeros = torch.zeros(1, 4)
    targets = TOODTargets(zeros.long(), torch.zeros(1, 4, 4), zeros + cls_sum / 4, zeros + box_sum / 4, zeros + 1)
    result = {"norms": [n.item() for n in TOODLoss(num_classes=2).normalizers(targets)]}
    losses = {"loss_cls": torch.tensor(float("nan") if rank == 1 else 0.5), "loss_box_reg": torch.tensor(0.25)}
    try:
        check_losses_finite(losses, 7)
    except FloatingPointError as e:
        result["error"] = str(e)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_average_normalizers_and_stop_together_on_nan(tmp_path):
    launch(_normalizer_worker, 2, dist_url="auto", args=(str(tmp_path),), timeout=timedelta(seconds=30))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        # The mean of the ranks' sums: (3 + 7) / 2 and (2 + 6) / 2.
        assert result["norms"] == [5.0, 4.0]
        # Rank 0's losses are finite, yet it stops too (rather than wait for rank 1 in the next collective).
        assert "at iteration 7 (rank 0: loss_cls=0.5, loss_box_reg=0.25; rank 1: loss_cls=nan" in result["error"]
