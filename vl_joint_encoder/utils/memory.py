"""Process memory: peak resident set, anonymous resident memory, and its peak over a block of code (what the KB-path
benchmark and tests measure; the training log reports the peak resident set)."""

from __future__ import annotations

import resource
import sys
import threading


def peak_rss_mib() -> float:
    """Peak resident set of this process so far (MiB). It counts the memory-mapped file pages that were read."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def anonymous_memory_mib() -> float | None:
    """Anonymous resident memory of this process (MiB): heap, Arrow and numpy buffers, not mapped file pages (which
    the kernel reclaims on demand). None where `/proc/self/status` has no RssAnon (not Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class AnonymousMemoryPeak:
    """
    `with AnonymousMemoryPeak() as peak: ...` then `peak.growth_mib`: the peak of anonymous resident memory during
    the block above its level at the start, sampled every `interval` seconds by a thread (and at both ends).
    Raises RuntimeError where anonymous memory cannot be read.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval

    def __enter__(self) -> AnonymousMemoryPeak:
        start = anonymous_memory_mib()
        if start is None:
            raise RuntimeError("anonymous memory is not readable here (no RssAnon in /proc/self/status)")
        self.start_mib = self.peak_mib = start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, anonymous_memory_mib() or 0.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, anonymous_memory_mib() or 0.0)
        self.growth_mib = self.peak_mib - self.start_mib


__all__ = ["AnonymousMemoryPeak", "anonymous_memory_mib", "peak_rss_mib"]
