"""Measuring peak training memory: CUDA's allocator peak, or the process' resident set on the CPU."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since the last `reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak memory used inside the block, above what the process held on entry.

    On CUDA: torch.cuda.max_memory_allocated minus the allocation on entry. On the CPU: the peak
    resident set size minus the resident set size on entry (exact on Linux, where the peak counter
    can be reset; elsewhere the process-lifetime peak, an upper bound).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss_above_start"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self.start = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak_bytes = peak_rss_bytes() - self.start
