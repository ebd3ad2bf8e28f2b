import os
import signal
import subprocess
import sys
import time

# Nothing downloads in a test: the Hugging Face libraries read these when first imported (by diffusionblocks).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from diffusionblocks import precision
from diffusionblocks.config import RunConfig
from diffusionblocks.tasks import apply_overrides, default_config, get_task

# As the CLI does (cli.main), before any worker thread starts: every test then computes under the same
# floating-point mode, whether it calls the library directly or through the CLI.
precision.flush_denormals()

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=3", "blocks.num_blocks=3",
        "train.batch_size=16", "train.steps_per_block=6", "train.log_every=2", "train.checkpoint_every=3",
        "train.lr_warmup_steps=2", "train.ema_halflife_steps=0", "sample.steps=6", "sample.samples_per_class=2"]


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A DiT small enough to train a few steps per test on the CPU."""
    return apply_overrides(default_config(), TINY)


@pytest.fixture(scope="module")
def one_thread():
    """Computes on one intra-op thread: reproducible across processes (torchrun's default), and not slowed down
    by a background job on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_schedules_agree(cfg, data) -> None:
    """Sequential and interleaved training give bit-identical blocks (every draw comes from (seed, block, step))."""
    from diffusionblocks.train import train

    seq = train(get_task(cfg.task), cfg, data, None, progress=False)
    inter = train(get_task(cfg.task), apply_overrides(cfg, ["train.schedule=interleaved"]), data, None, progress=False)
    for b in seq:
        a, c = seq[b].denoiser.state_dict(), inter[b].denoiser.state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a), b


def kill_training_once(run, args: list[str], block: int, min_step: int) -> int:
    """Starts `diffusionblocks train --out run ARGS` in another process and SIGKILLs it once `block` has saved a
    checkpoint at `min_step` or later; returns the step block's weights file then holds."""
    from diffusionblocks import checkpoint

    proc = subprocess.Popen([sys.executable, "-m", "diffusionblocks", "train", "--out", str(run), "--no-progress",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.block_step(run, block) or 0) >= min_step:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return checkpoint.block_step(run, block)


def pytest_terminal_summary(terminalreporter):
    """Says how tests/test_regression.py compared runs on this machine, when it ran."""
    import digests

    if not any(r.nodeid.startswith("tests/test_regression.py") for reps in terminalreporter.stats.values()
               for r in reps if hasattr(r, "nodeid")):
        return
    env = digests.environment()
    if digests.recording_for(env) is not None:
        line = f"regression digests: exact mode (this environment is recorded: {env['cpu_capability']}, {env['cpu']})"
    else:
        line = (f"regression digests: tolerant mode, no recording for this environment {env}; add one with "
                "`python tests/digests.py record SCRATCH_DIR`")
    terminalreporter.write_line(line)
