"""Process settings made at start: a small footprint for a gateway's edge, speed for a simulation's processes.

Both set glibc's malloc through ``mallopt`` (elsewhere, not Linux or not glibc, that part does nothing) and keep
BLAS and OpenMP pools at one thread (read when numpy loads, so set only before that, and only where the
environment does not set them).
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # glibc mallopt parameters (malloc.h)
GATEWAY_MMAP_THRESHOLD = 128 * 1024
"""Allocations from this size up are mmapped and go back to the system when freed."""
GATEWAY_ARENAS = 1
"""malloc arenas of a gateway process (glibc's default: 8 per core, one per thread that allocates)."""
SIMULATION_MALLOC = {M_MMAP_THRESHOLD: 1 << 20, M_TOP_PAD: 1 << 20, M_TRIM_THRESHOLD: 4 << 20, M_ARENA_MAX: 2}
"""A simulation process's malloc: fit-sized temporaries (a few hundred kB) come from the heap, which keeps up to
4 MB free at its top instead of returning it after every fit."""
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _one_thread_pools() -> None:
    if "numpy" not in sys.modules:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, "1")


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc ``mallopt`` settings; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def tune_gateway_process() -> None:
    """Settings for a long-running edge on a small gateway, made at process start (``wearfl edge``).

    * BLAS and OpenMP pools of one thread: the edge's matrices are small, and every pool thread holds its own
      buffers.
    * glibc malloc: one arena, and a fixed mmap threshold. By default every thread that
      allocates gets an arena of its own (the edge's worker threads each keep a partly used
      heap), and the threshold grows after the first large free, so numpy's large temporaries
      then come from the heap and stay resident after a fit instead of going back to the system.

    Measured on ``wearfl edge`` (scripts/bench_edge_footprint.py) as a drop of the peak resident
    set by about a sixth.
    """
    _one_thread_pools()
    _mallopt({M_ARENA_MAX: GATEWAY_ARENAS, M_MMAP_THRESHOLD: GATEWAY_MMAP_THRESHOLD})


def tune_simulation_process() -> bool:
    """Settings for a process that runs many simulated edges' fits one after another (``wearfl simulate``, its
    worker processes): :data:`SIMULATION_MALLOC`.

    glibc's default mmaps a fit's larger temporaries, or trims the heap after them, so every fit pays page faults
    for memory it just gave back: a third of a light edge's fit time and most of a worker's system time. True
    when the settings were made. BLAS pools of one thread, as on a gateway: its processes already keep the
    cores busy.
    """
    _one_thread_pools()
    return _mallopt(SIMULATION_MALLOC)
