"""Peak memory of a block of work, on CUDA (allocator statistics) or CPU (resident set size)."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import threading
from types import TracebackType

import torch

log = logging.getLogger(__name__)

_STATM = "/proc/self/statm"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the elements of `tensors` (None is skipped; a view counts at its own size)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def keep_freed_heap(mmap_threshold_mib: int = 32, trim_threshold_mib: int = 256) -> bool:
    """Let glibc reuse freed heap memory for large CPU temporaries instead of returning it to the OS.

    By default glibc serves large blocks with fresh mmap pages and trims free memory at the heap's
    top, so a decode step's megabyte-sized temporaries (logits, the sampler's noise, LineAR's line
    scores) page-fault on every use: on this project's 2-core machine a (64, 8, 24, 121) fp32 batched
    product followed by a scale took 5.0 ms instead of 1.9 ms. Blocks up to `mmap_threshold_mib`
    then come from the heap, and up to `trim_threshold_mib` of free heap stays mapped.
    `trim_heap` (glibc `malloc_trim`) still returns it, as the efficiency benchmark does before each
    timed run. Returns False where mallopt is unavailable (not glibc).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("mallopt unavailable: large CPU temporaries are served by the allocator's defaults")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mib * 2**20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_mib * 2**20))


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), where possible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim unavailable: CPU peak memory of later runs may read low")


def _rss_bytes() -> int:
    """Current resident set size of this process: resident pages (2nd field of statm) * page size."""
    with open(_STATM, "rb") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """Lifetime peak RSS from getrusage; Linux reports KiB, macOS bytes."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024


class PeakMemory:
    """Context manager: peak memory of the enclosed work on `device`, above what was held at entry.

    CUDA: `reset_peak_memory_stats` at entry, `max_memory_allocated` at exit (both after a
    synchronize, so queued kernels are counted where they belong). This counts tensors only, not the
    caching allocator's reserve or the CUDA context.

    CPU: a daemon thread polls the resident set size every `poll_interval_s`, plus one reading at
    exit. Polling is needed because a temporary freed before exit is invisible at exit; it can still
    miss a spike shorter than the interval. Where /proc is missing, falls back to getrusage's
    lifetime peak, which only registers a block that sets a new process-wide high (a lower bound).

    After exit: `peak_bytes` (absolute), `baseline_bytes` (at entry), `peak_increase_bytes`
    (peak - baseline, never negative) and `method` (how it was measured).
    """

    def __init__(self, device: torch.device | str, poll_interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"PeakMemory supports cuda and cpu devices, got {self.device}; "
                "run on one of those or measure memory another way."
            )
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}.")
        self.poll_interval_s = poll_interval_s
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.peak_increase_bytes = 0
        self.method = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._polled_peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        elif os.path.exists(_STATM):
            self.method = "cpu_rss_poll"
            self.baseline_bytes = _rss_bytes()
            self._polled_peak = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="PeakMemory-poll", daemon=True)
            self._thread.start()
        else:
            self.method = "cpu_getrusage_maxrss (no /proc: lifetime peak, increase is a lower bound)"
            self.baseline_bytes = _max_rss_bytes()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.peak_bytes = max(self._polled_peak, _rss_bytes())
        else:
            self.peak_bytes = max(self.baseline_bytes, _max_rss_bytes())
        self.peak_increase_bytes = max(0, self.peak_bytes - self.baseline_bytes)
        log.debug("peak memory %s: +%d bytes (%s)", self.device, self.peak_increase_bytes, self.method)

    @property
    def polling(self) -> bool:
        """Whether the CPU poll thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _poll(self) -> None:
        # Event.wait doubles as the sleep, so exit never waits a full interval for the thread.
        while True:
            self._polled_peak = max(self._polled_peak, _rss_bytes())
            if self._stop.wait(self.poll_interval_s):
                return
