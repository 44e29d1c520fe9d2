"""This process's memory as Linux reports it under ``/proc/self``: resident set size and its
peak (the kernel's high-water mark), for the benchmarks' memory columns."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``, the same count as ``VmRSS``),
    in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's peak resident set size of this process (``VmHWM``), in bytes; 0 if unknown."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
