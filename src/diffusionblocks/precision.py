"""Arithmetic precision of training and inference: float32, TF32 matmuls, or bfloat16 autocast.

With "bf16" only the operations autocast lists (matmuls, convolutions, attention) run in bfloat16;
parameters, gradients, optimiser state, the EMA, the preconditioning and the loss stay float32.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .config import ConfigError


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
    every caller computes the same numbers at the same speed."""
    torch.set_flush_denormal(True)


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
