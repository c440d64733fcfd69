"""What the machine lends a run: the CPU cores this process may use.

The CPU preset (``bundles/common/configs/presets/cpu.json``) sets ``num_threads`` from :func:`usable_cores`, so a
run uses the cores it is allowed (its affinity mask: ``taskset``, a container's ``cpuset``), not a fixed count.
Two runs at once on those cores each need ``--num_threads 1`` or fewer threads than cores between them: threads
that outnumber the cores make every step wait on the others (issue 20 measured two-thread runs sharing two cores
about 20 times slower per step).
"""

from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    """The number of CPU cores this process may run on: ``len(os.sched_getaffinity(0))`` where the platform has
    it (Linux), else ``os.cpu_count()``; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)
