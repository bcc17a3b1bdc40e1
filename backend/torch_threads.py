"""How many threads PyTorch gets in a process that runs the model (a worker; the server in embedded mode).

PyTorch's default, a thread per core in every process, makes workers sharing a machine fight over its
cores, and their throughput falls several times over; so each such process sizes its thread pools at its
start (:func:`apply_torch_threads`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from backend.settings import Settings

log = logging.getLogger(__name__)
# cgroup v2's CPU limit of this process's group ("<quota> <period>" in microseconds, or "max <period>").
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container
    started with ``--cpus 2`` still has every core of the machine in its affinity)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or no quota ("max")
        return cores


def torch_thread_count(settings: Settings, cores: int, omp_num_threads: str = "") -> int:
    """PyTorch threads for one model process: SEGMASK_TORCH_THREADS when set; else OMP_NUM_THREADS (what
    PyTorch itself obeys) when set; else an equal share of ``cores`` for each of SEGMASK_WORKERS_PER_HOST."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    if omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads)
    return max(1, cores // max(1, settings.workers_per_host))


def apply_torch_threads(settings: Settings) -> int:
    """Size this process's PyTorch intra- and inter-op thread pools by :func:`torch_thread_count`, log it,
    and return the count. Call it before the model does any work: PyTorch fixes the inter-op pool then."""
    cores = usable_cores()
    threads = torch_thread_count(settings, cores, os.environ.get("OMP_NUM_THREADS", ""))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError as exc:  # PyTorch takes it once, before any inter-op work; serve anyway
        log.warning("PyTorch's inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
    log.info(
        "PyTorch threads: %d intra-op, %d inter-op (SEGMASK_TORCH_THREADS=%d, OMP_NUM_THREADS=%s, "
        "%d usable cores, SEGMASK_WORKERS_PER_HOST=%d)",
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
        settings.torch_threads,
        os.environ.get("OMP_NUM_THREADS", "unset"),
        cores,
        settings.workers_per_host,
    )
    return threads
