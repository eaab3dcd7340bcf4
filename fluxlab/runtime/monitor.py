"""Measuring a run: peak host memory (RSS, sampled) and peak device memory, for reports and grids.

The process-wide `ru_maxrss` only ever grows, so it cannot tell one grid cell from the next; a sampling
thread reading /proc/self/statm can. On systems without /proc it falls back to ru_maxrss.
"""

from __future__ import annotations

import os
import resource
import threading
import time


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager: peak host RSS and device allocation (bytes) while the block runs."""

    def __init__(self, device=None, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.host_peak = 0
        self.device_peak = None
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.host_peak = max(self.host_peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self):
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.host_peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.host_peak = max(self.host_peak, current_rss())
        if self.device is not None and self.device.type == "cuda":
            import torch

            self.device_peak = torch.cuda.max_memory_allocated(self.device)
        return False
