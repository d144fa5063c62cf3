"""Peak memory of a region of code, for the benchmarks: the CUDA allocator's peak, or on CPU the
process's peak resident set (Linux VmHWM, reset before each region, with glibc's dynamic mmap
threshold off so that freed tensors leave the resident set)."""

import ctypes
from pathlib import Path

import torch


class Memory:
    """Peak memory of a region of code (bytes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed: big buffers return to the OS
            self.libc = libc

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")
