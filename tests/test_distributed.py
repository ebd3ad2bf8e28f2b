"""Block-parallel training on torch.distributed (gloo, processes on localhost) and independent per-block jobs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from diffusionblocks import checkpoint
from diffusionblocks.cli import main
from diffusionblocks.distributed import assign

ARGS = ["--no-progress", "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "blocks.num_blocks=2",
        "train.batch_size=16", "train.steps_per_block=12", "train.checkpoint_every=4", "sample.steps=3",
        "sample.samples_per_class=1"]


def torchrun(nproc, *args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "diffusionblocks", "train", "--schedule", "parallel", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def weights(run, B=2):
    return {b: checkpoint.load_train_state(run, b)["model"] for b in range(B)}


def max_diff(w1, w2):
    return max((w1[b][k] - w2[b][k]).abs().max().item() for b in w1 for k in w1[b])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, one_thread):
    run = tmp_path_factory.mktemp("seq") / "run"
    assert main(["train", "--out", str(run), *ARGS]) == 0
    return run


def test_assignment():
    a = assign(3, 4, [0, 1])
    assert a.group_ranks == ((0, 1), (2, 3)) and a.my_blocks == (1,) and a.shard == (1, 2) and not a.is_leader
    a = assign(1, 2, [0, 1, 2, 3, 4])  # fewer ranks than blocks: each group trains its blocks in turn
    assert a.group_blocks == ((0, 2, 4), (1, 3)) and a.my_blocks == (1, 3) and a.is_leader
    a = assign(4, 5, [0, 1])  # uneven: groups of 2 and 3 ranks
    assert a.group_ranks == ((0, 1), (2, 3, 4)) and a.shard == (2, 3)


def test_two_processes_one_block_each_equal_sequential_training(sequential, tmp_path):
    run = tmp_path / "par2"
    log = torchrun(2, "--out", str(run), *ARGS)
    assert "ranks [0] train block(s) [0]; ranks [1] train block(s) [1]" in log
    assert max_diff(weights(sequential), weights(run)) <= 1e-6
    assert (run / "samples.png").is_file()


def test_four_processes_two_data_parallel_ranks_per_block(sequential, tmp_path, capsys):
    run = tmp_path / "par4"
    log = torchrun(4, "--out", str(run), *ARGS)
    assert "ranks [0, 1] train block(s) [0]; ranks [2, 3] train block(s) [1]" in log
    assert [checkpoint.block_step(run, b) for b in range(2)] == [12, 12]
    # Data-parallel halves of each batch, gradients averaged: the same training up to rounding.
    assert max_diff(weights(sequential), weights(run)) <= 1e-5
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--num", "4", "--steps", "3", "--out", str(out), "--no-progress"]) == 0


def test_killed_block_job_resumes_alone_and_ends_equal(sequential, tmp_path, capsys):
    run = tmp_path / "jobs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def job(b, *extra):
        return subprocess.Popen([sys.executable, "-m", "diffusionblocks", "train", "--out", str(run), "--blocks",
                                 str(b), *extra, *ARGS, "train.steps_per_block=200"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    run.mkdir()
    p0, p1 = job(0), job(1)
    deadline = time.time() + 120
    while time.time() < deadline and (checkpoint.block_step(run, 1) or 0) < 8:
        time.sleep(0.02)
    os.killpg(p1.pid, signal.SIGKILL)
    p1.wait()
    assert p0.wait(timeout=180) == 0, p0.stderr.read()
    killed_at = checkpoint.block_step(run, 1)
    assert 8 <= killed_at < 200
    main(["status", str(run)])
    assert "partial" in capsys.readouterr().out
    block0 = {p: p.read_bytes() for p in (checkpoint.block_weights_path(run, 0), checkpoint.block_state_path(run, 0))}
    assert main(["train", "--resume", str(run), "--blocks", "1", "--no-progress"]) == 0
    assert {p: p.read_bytes() for p in block0} == block0  # only block 1 resumed
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *ARGS, "train.steps_per_block=200"]) == 0
    assert max_diff(weights(ref), weights(run)) <= 1e-6
    main(["status", str(run)])
    assert "2/2 trained; every block is present" in capsys.readouterr().out


def test_joining_a_run_with_another_config_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--blocks", "0", *ARGS]) == 0
    assert main(["train", "--out", str(run), "--blocks", "1", *ARGS, "train.lr=0.5"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--blocks", "0", *ARGS]) == 2
    assert "already have checkpoints" in capsys.readouterr().err
