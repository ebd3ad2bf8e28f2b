"""Arithmetic precision of training and inference: float32, TF32 matmuls, or bfloat16 autocast.

With "bf16" only the operations autocast lists (matmuls, convolutions, attention) run in bfloat16;
parameters, gradients, optimiser state, the EMA, the preconditioning and the loss stay float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from .config import ConfigError

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _cuda_bf16(index: int | None) -> bool:
    return torch.cuda.is_bf16_supported()


def resolve(name: str, device: torch.device) -> str:
    """The precision a config's `precision` means on `device`: "auto" is bf16 on CUDA devices that have it, else fp32."""
    device = torch.device(device)
    if name == "auto":
        return "bf16" if device.type == "cuda" and _cuda_bf16(device.index) else "fp32"
    if name == "tf32" and device.type != "cuda":
        raise ConfigError(f"precision 'tf32' is a CUDA matmul mode; on {device.type} use 'fp32' or 'bf16'")
    if name == "bf16" and device.type == "cuda" and not _cuda_bf16(device.index):
        raise ConfigError(f"precision 'bf16': this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16")
    return name


def flush_denormals() -> None:
    """Denormal floats to zero on the CPU (torch.set_flush_denormal), for this thread and the threads torch starts
    after it (they inherit the setting; workers already running keep theirs). On x86 an operation on denormals is
    several times slower, and the blocks of the lowest noise levels make them (a nearly saturated loss at sigma ~
    0.002, scaled by c_out ~ sigma): without it the last digits-ViT block trained at 3.1 steps/s instead of 14.9.
    Training and evaluation call it (`train.train`, `runs.evaluate_run`, the CLI before anything else), so that
    every caller computes the same numbers at the same speed. A script that ran torch's parallel work before (loading
    data, a first training) has workers that do not flush: the first call checks them and warns, and such a script
    should call this first thing (measured: a 2-thread multiply of denormals 10.5 ms against 2.4 flushed)."""
    global _probed
    if torch.set_flush_denormal(True) and not _probed:
        _probed = True  # once: workers started after a flush inherit it
        if _flushed_everywhere():
            return
        logger.warning("denormal floats are flushed in this thread but not in torch's worker threads, started before "
                       "it: training the lowest-noise blocks is slower and its numbers differ from the command's; "
                       "call diffusionblocks.precision.flush_denormals() before any torch work (or use one thread)")


_probed = False


def _flushed_everywhere() -> bool:
    """Whether torch's intra-op threads flush denormals too: a product of denormals spread over all of them is 0."""
    n = min(32768 * torch.get_num_threads(), 1 << 22)  # enough elements for every thread a share (ATen's grain)
    tiny = torch.full((n,), 1000, dtype=torch.int32).view(torch.float32)  # 1.4e-42, a denormal bit pattern
    return not bool((tiny * 1.0).any())


def autocast(precision: str, device: torch.device):
    """The context that computes a forward pass in `precision` (a resolved one)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def matmul_mode(precision: str):
    """TF32 matmuls and convolutions on CUDA while inside, for "tf32"; the previous mode is restored after."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
