import pytest
import torch

from diffusionblocks.config import RunConfig, apply_overrides
from diffusionblocks.tasks import default_config

# As the CLI does (cli.main), before any worker thread starts: every test then computes under the same
# floating-point mode, whether it calls the library directly or through the CLI.
torch.set_flush_denormal(True)

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth=3", "blocks.num_blocks=3",
        "train.batch_size=16", "train.steps_per_block=6", "train.log_every=2", "train.checkpoint_every=3",
        "train.lr_warmup_steps=2", "sample.steps=6", "sample.samples_per_class=2"]


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
