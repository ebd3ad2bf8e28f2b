"""Arithmetic precision of training and inference: float32, TF32 matmuls, or bfloat16 autocast; and the CPU's two
process-wide speed settings, denormals flushed to zero and freed memory kept for reuse.

With "bf16" only the operations autocast lists (matmuls, convolutions, attention) run in bfloat16;
parameters, gradients, optimiser state, the EMA, the preconditioning and the loss stay float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform

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


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters (glibc's malloc.h)


def keep_freed_memory(keep: int = 256 << 20) -> bool:
    """glibc's malloc told to keep up to `keep` bytes of freed memory at the top of its heaps for reuse
    (M_TRIM_THRESHOLD) instead of handing it back to the kernel, to grow them `keep` / 4 at a time (M_TOP_PAD), and to
    serve every block under `keep` / 4 from them (M_MMAP_THRESHOLD): on the CPU what CUDA's caching allocator does on
    a GPU. By default glibc returns the pages of a step's freed activations and the next step faults them back in,
    which costs the language trunk's training step up to 14% on our 2-core machines, the most where the machine is
    slow (issue 26, benchmarks/results/trunk-speed). The price: the resident set may stay up to `keep` above what
    the process holds (its peak hardly moves: what is kept was freed below it). Process-wide and for good;
    call it before the work. False (nothing changed) where the C library is not glibc."""
    global kept_freed_memory
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    if not all(mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, keep // 4), (_M_TRIM_THRESHOLD, keep), (_M_TOP_PAD, keep // 4))):
        return False
    kept_freed_memory = keep
    return True


kept_freed_memory = 0  # bytes: what `keep_freed_memory` set in this process (0: glibc's defaults)


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
