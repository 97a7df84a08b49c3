"""Test helper: measured host memory (resident set) of a process, peaks included.

Peaks come from the kernel's high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``.
Child processes should run with ``MALLOC_MMAP_THRESHOLD_`` small (see :data:`MALLOC_ENV`): glibc
then serves every tensor-sized allocation with its own mapping and returns it on free, so the
resident set follows live tensors instead of malloc's cached arenas.
"""

from __future__ import annotations

import re

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def rss() -> int:
    """Resident bytes now."""
    return _status("VmRSS")


def reset_peak() -> None:
    """Start a new peak measurement (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    """Highest resident bytes since :func:`reset_peak`."""
    return _status("VmHWM")
