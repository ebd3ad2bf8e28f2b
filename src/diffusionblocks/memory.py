"""Measuring peak training memory: CUDA's allocator peak; on the CPU, the process' resident set, or the peak
of the bytes PyTorch's CPU allocator has handed out (the CPU's counterpart of CUDA's measure)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


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


CPU_MEASURES = ("rss", "allocated")


def peak_of_allocations(events: list[tuple[int, int]]) -> int:
    """The highest running total of (time, signed bytes) allocation events taken in time order (0 if it never rises);
    at equal times allocations count before frees, so a tie can only raise the peak."""
    peak = live = 0
    for _, nbytes in sorted(events, key=lambda e: (e[0], -e[1])):
        live += nbytes
        peak = max(peak, live)
    return peak


class PeakMemory:
    """Context manager: peak memory used inside the block, above what the process held on entry.

    On CUDA: torch.cuda.max_memory_allocated minus the allocation on entry. On the CPU, `cpu_measure`:
    "rss", the peak resident set size minus the resident set size on entry (exact on Linux, where the
    peak counter can be reset; elsewhere the process-lifetime peak, an upper bound), which counts what
    the C allocator keeps after tensors are freed; or "allocated", the peak of the bytes PyTorch's CPU
    allocator handed out inside the block, less those it took back, replayed from the profiler's memory
    events (tensors only, as CUDA's measure; memory freed inside the block but allocated before it is
    not subtracted, so this can only err high). "allocated" records every operator: for benchmarks
    of a few steps, not for long runs.
    """

    def __init__(self, device: torch.device | str, cpu_measure: str = "rss"):
        if cpu_measure not in CPU_MEASURES:
            raise ValueError(f"cpu_measure {cpu_measure!r} is not one of {', '.join(CPU_MEASURES)}")
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.cpu_measure = cpu_measure
        self.kind = ("cuda_max_memory_allocated" if self.device.type == "cuda"
                     else f"cpu_peak_{cpu_measure}_above_start")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.cpu_measure == "allocated":
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.start()
        else:
            reset_peak_rss()
            self.start = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.cpu_measure == "allocated":
            self._profiler.stop()
            events = [(e.start_ns(), e.nbytes()) for e in self._profiler.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
            self.peak_bytes = peak_of_allocations(events)
            del self._profiler
        else:
            self.peak_bytes = peak_rss_bytes() - self.start
