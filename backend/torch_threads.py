"""How a process that runs the model (a worker; the server in embedded mode) uses its cores: how many
requests it runs at once (model slots) and how many threads PyTorch gets for each.

PyTorch's default, a thread per core in every process, makes workers sharing a machine fight over its
cores, and their throughput falls several times over; so each such process sizes its thread pools at its
start (:func:`apply_torch_threads`) and its runtime's model lock by the same plan.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ThreadPlan:
    """How a model process uses its cores: ``slots`` requests at once (backend.model_lock), each on
    ``threads`` PyTorch threads."""

    slots: int
    threads: int


def thread_plan(
    settings: Settings, cores: int, omp_num_threads: str = "", concurrency: int | None = None
) -> ThreadPlan:
    """The plan of a process with ``cores`` usable cores that runs at most ``concurrency`` requests at once
    (None: as many as it is given; a worker: its job and its click lane). Its share of the cores is
    ``cores`` / SEGMASK_WORKERS_PER_HOST. Threads per slot: SEGMASK_TORCH_THREADS when set, else
    OMP_NUM_THREADS (what PyTorch itself obeys) when set. Slots: SEGMASK_MODEL_SLOTS when set, else one per
    thread of the share (capped by ``concurrency``); threads not set are the share divided among the slots.
    One thread per request beside others is the default because a click's small convolutions keep one core
    busy, not two: two clicks at once on a thread each served 1.3-1.4x the clicks of one at a time on two
    threads (bench/README.md, bench_model_slots.py); a request running alone gets every slot's threads
    (backend.runtime.Runtime)."""
    share = max(1, cores // max(1, settings.workers_per_host))
    threads = settings.torch_threads
    if threads <= 0 and omp_num_threads.strip().isdigit():
        threads = int(omp_num_threads)
    slots = settings.model_slots
    if slots <= 0:
        slots = max(1, min(share // max(threads, 1), concurrency or share))
    if threads <= 0:
        threads = max(1, share // slots)
    return ThreadPlan(slots, threads)


def process_plan(settings: Settings, concurrency: int | None = None) -> ThreadPlan:
    """:func:`thread_plan` of this process (its usable cores and OMP_NUM_THREADS)."""
    return thread_plan(settings, usable_cores(), os.environ.get("OMP_NUM_THREADS", ""), concurrency)


def apply_torch_threads(settings: Settings, concurrency: int | None = None) -> ThreadPlan:
    """Size this process's PyTorch intra- and inter-op thread pools by its :func:`thread_plan`, log it, and
    return the plan. Call it before the model does any work: PyTorch fixes the inter-op pool then."""
    cores = usable_cores()
    plan = thread_plan(settings, cores, os.environ.get("OMP_NUM_THREADS", ""), concurrency)
    torch.set_num_threads(plan.threads)
    try:
        torch.set_num_interop_threads(plan.threads)
    except RuntimeError as exc:  # PyTorch takes it once, before any inter-op work; serve anyway
        log.warning("PyTorch's inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
    log.info(
        "PyTorch threads: %d intra-op, %d inter-op, for each of %d model slots (SEGMASK_TORCH_THREADS=%d, "
        "SEGMASK_MODEL_SLOTS=%d, OMP_NUM_THREADS=%s, %d usable cores, SEGMASK_WORKERS_PER_HOST=%d)",
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
        plan.slots,
        settings.torch_threads,
        settings.model_slots,
        os.environ.get("OMP_NUM_THREADS", "unset"),
        cores,
        settings.workers_per_host,
    )
    return plan
