"""A trained run as a model: its blocks built by its task, their weights loaded, chained by the router.

    model, cfg = from_pretrained("runs/00000-digits-dit-B3")            # every block in memory
    model, cfg = from_pretrained(run, "cuda", stream=True)              # one block at a time

This sits above the task registry (it asks the run's task to build each block); checkpoint.py and
rundir.py, which read and write the files, know nothing of tasks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .blocks import BlockwiseDenoiser, StreamingBlocks
from .checkpoint import check_block_metadata, load_block_weights
from .config import ConfigError, RunConfig
from .rundir import block_weights_path
from .tasks import get_task, read_config


def from_pretrained(run_dir: str | Path, device: str | torch.device = "cpu",
                    stream: bool = False) -> tuple[BlockwiseDenoiser, RunConfig]:
    """Loads a trained run as a BlockwiseDenoiser in eval mode; returns (model, config).

    stream: keep one block in memory at a time, loading each from disk when the sampler reaches it.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    task = get_task(cfg.task)
    missing = [b for b in range(cfg.blocks.num_blocks) if not block_weights_path(run_dir, b).is_file()]
    if missing:
        raise ConfigError(f"run {str(run_dir)!r} is missing the weights of block(s) {', '.join(map(str, missing))} "
                          f"of {cfg.blocks.num_blocks}")

    verified: set[int] = set()  # copied blocks whose sha256 was checked: streaming loads a block many times

    def load(b: int) -> torch.nn.Module:
        block = task.build_block(cfg, b)
        load_block_weights(run_dir, b, block, cfg, verify=b not in verified)
        verified.add(b)
        return block.to(device).eval()

    if stream:
        for b in range(cfg.blocks.num_blocks):  # a wrong or corrupt file fails now, not halfway through sampling
            check_block_metadata(block_weights_path(run_dir, b), b, cfg)
        return BlockwiseDenoiser(StreamingBlocks(cfg.blocks.num_blocks, load), task.partition(cfg)), cfg
    model = BlockwiseDenoiser([load(b) for b in range(cfg.blocks.num_blocks)], task.partition(cfg)).eval()
    return model, cfg
