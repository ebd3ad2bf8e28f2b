"""The block router: B independently trained block denoisers chained as one denoiser (method.md section 4).

A run's blocks and partition are its task's (`Task.build_block`, `Task.partition`); the router only chains them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .noise import Partition


class StreamingBlocks:
    """B blocks of which at most one is in memory: block b is loaded on first use and replaces the previous one.

    A sampler walks the sigma grid downwards, so each block is loaded once (Heun's correction at a
    boundary switches one step early). For models whose blocks do not fit on the device together.
    """

    def __init__(self, num_blocks: int, load: Callable[[int], nn.Module]):
        self.num_blocks, self.load = num_blocks, load
        self.current: tuple[int, nn.Module] | None = None
        self.loads = 0  # blocks loaded so far

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, b: int) -> nn.Module:
        if self.current is None or self.current[0] != b:
            self.current = None  # free the resident block before loading the next
            self.current = (b, self.load(b))
            self.loads += 1
        return self.current[1]


class BlockwiseDenoiser(nn.Module):
    """Routes each call `D(x, sigma, **cond)` to the block that owns sigma; block 0 owns the highest noise.

    Samples in one batch may carry different sigmas: each is sent to its own block. With the
    samplers' shared sigma, one step runs one block, i.e. L/B layers instead of L.
    """

    def __init__(self, blocks: list[nn.Module] | StreamingBlocks, partition: Partition):
        super().__init__()
        if len(blocks) != partition.num_blocks:
            raise ValueError(f"{len(blocks)} blocks given for a partition into {partition.num_blocks}")
        self.blocks = blocks if isinstance(blocks, StreamingBlocks) else nn.ModuleList(blocks)
        self.partition = partition
        self.sigma_min, self.sigma_max = partition.axis.lo, partition.axis.hi

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.route(_call, x, sigma, **cond)

    def route(self, call: Callable, x: torch.Tensor, sigma: torch.Tensor, **cond):
        """call(block, x, sigma, **cond) on the block that owns each sample's sigma (N,); its output, a tensor or a
        tuple of tensors with the samples first, merged in the batch's order."""
        owner = self.partition.owner(sigma)  # (N,)
        first = int(owner[0])
        if bool((owner == first).all()):
            return call(self.blocks[first], x, sigma, **cond)
        merged = None
        for b in owner.unique().tolist():
            m = owner == b
            sub = {k: v[m] if torch.is_tensor(v) and v.shape[:1] == sigma.shape else v for k, v in cond.items()}
            out = call(self.blocks[b], x[m], sigma[m], **sub)
            parts = out if isinstance(out, tuple) else (out,)
            if merged is None:
                merged = tuple(p.new_empty((x.shape[0], *p.shape[1:])) for p in parts)
            for whole, p in zip(merged, parts):
                whole[m] = p
        return merged if isinstance(out, tuple) else merged[0]


def _call(block: nn.Module, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    return block(x, sigma, **cond)


class BridgedDenoiser(nn.Module):
    """The samplers' D(x, sigma, **cond) over a router of blocks whose denoiser returns (D, logits) (method.md
    section 5: label and token denoisers).

    Each call runs the owning block's `denoise(block, x, sigma, **cond) -> (D, logits)` and hands the sampler the
    estimate between steps, `bridge(block, D, logits)`: classification's softmax(logits) @ E, the language models'
    bridges. `logits` keeps the latest call's logits (a sampler's callback reads the step's own).

    Args:
        model: the router of the blocks.
        bridge: bridge(block, D, logits) -> the estimate in the denoised space, shaped like D.
        denoise: how a block is called; default `block.denoise(x, sigma, **cond)`.
    """

    def __init__(self, model: BlockwiseDenoiser, bridge: Callable, denoise: Callable | None = None):
        super().__init__()
        self.model, self.bridge, self.denoise = model, bridge, denoise
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        estimate, self.logits = self.model.route(self._step, x, sigma, **cond)
        return estimate

    def _step(self, block: nn.Module, x: torch.Tensor, sigma: torch.Tensor,
              **cond) -> tuple[torch.Tensor, torch.Tensor]:
        D, logits = block.denoise(x, sigma, **cond) if self.denoise is None else self.denoise(block, x, sigma, **cond)
        return self.bridge(block, D, logits), logits
