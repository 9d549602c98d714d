"""tools/train_net.py as several machines start it: one process per machine (``--num-machines 2 --machine-rank R
--num-gpus 1``) meeting at ``--dist-url``, on CPU over gloo; and a machine that never joins."""

import subprocess
import time

import pytest
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port

from tests.conftest import REPO_ROOT
from tests.tools import test_train_net
from tests.tools.test_train_net import losses_by_iter, read_metrics, run_train_net, train_net_command
from tood import compat

tiny = test_train_net.tiny  # the fixture of the tiny setup (config file, --register-coco arguments)

COMMON = ["train.max_iter=4", "dataloader.train.total_batch_size=4", "train.eval_period=0"]


@pytest.fixture
def start_machine(tiny):
    """Starts tools/train_net.py as machine ``rank`` of 2 (one process) meeting at ``url``; a machine still running
    when the test ends is killed."""
    started = []

    def start(rank, url, output_dir, *flags):
        args = ["--num-machines", "2", "--machine-rank", str(rank), "--num-gpus", "1", "--dist-url", url, *flags]
        cmd = train_net_command(tiny, *args, *COMMON, f"train.output_dir={output_dir}")
        started.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
        )
        return started[-1]

    yield start
    for machine in started:
        if machine.poll() is None:
            machine.kill()
            machine.wait()


@pytest.mark.slow
def test_two_machines_reproduce_one_process(tiny, start_machine, tmp_path):
    """Two machines of one process each, total batch 4 (2 images each), log the losses of one process on the
    same batch of 4: each process reads its share of the sampler's stream, BN is synchronised, gradients are
    averaged (see test_two_cpu_processes_reproduce_one in test_train_net.py, which splits one machine in two)."""
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    # A machine left alone (the other failed) gives up within 2 minutes.
    machines = [start_machine(rank, url, tmp_path / f"machine{rank}", "--dist-timeout", "120") for rank in (0, 1)]
    outputs = [m.communicate(timeout=600)[0] for m in machines]
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank}:\n{output[-5000:]}"
    run_train_net(tiny, "--num-gpus", "1", *COMMON, f"train.output_dir={tmp_path / 'one'}")
    one, two = losses_by_iter(read_metrics(tmp_path / "one")), losses_by_iter(read_metrics(tmp_path / "machine0"))
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for i in range(4):
        for key in ("loss_cls", "loss_box_reg"):
            assert two[i][key] == pytest.approx(one[i][key], rel=1e-3), (i, key)
    # Only the first machine's main process writes the metrics and checkpoints.
    assert not (tmp_path / "machine1" / "metrics.json").exists()


# Machine 0 alone in the fast tier (~20 s), machine 1 alone in the slow one.
@pytest.mark.parametrize("rank", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_machine_that_never_joins_ends_the_other(start_machine, tmp_path, rank):
    """Machine 0 hosts the meeting point at --dist-url and waits for machine 1; machine 1 waits for machine 0 to
    answer. Alone, either ends within --dist-timeout (plus the start of its process) with an error naming the URL."""
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    start = time.perf_counter()
    machine = start_machine(rank, url, tmp_path, "--dist-timeout", "5")
    output = machine.communicate(timeout=300)[0]
    assert machine.returncode != 0
    assert time.perf_counter() - start < 120
    if compat.launch is d2_launch:
        # Detectron2's own launch (its main branch): it logs the URL, and torch.distributed's error says what timed out.
        assert f"Process group URL: {url}" in output and "timed out" in output.lower(), output[-3000:]
    else:
        assert f"did not meet the others at --dist-url {url} within --dist-timeout (5 s)" in output, output[-3000:]
