"""What the step benchmarks share: timing one call, and writing the figures.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import json
import time

__all__ = ["timed", "cpu_seconds", "write_json"]


def timed(fn, cpu=None):
    """Wall seconds of ``fn()``; its CPU seconds (the process's, every thread's) appended to ``cpu`` if given."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return t


def cpu_seconds(fn):
    """CPU seconds of the process (every thread's) while ``fn()`` runs."""
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def write_json(result, path):
    """``result`` as indented JSON at ``path``, and a line saying so."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
